"""`k2 report checks|files`: the compliance reports."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import click

from k2_assets.cli.common import DATE, dagster_instance, date_range, progress, settings

FORMATS = click.Choice(("html", "csv", "md"))


@click.group("report")
def report() -> None:
    """Compliance reports: every asset check result, and the vendor-file ledger."""


def _range_options(command):
    for option in reversed(
        (
            click.option("--start", required=True, type=DATE, help="first partition (session date)"),
            click.option("--end", required=True, type=DATE, help="last partition (session date), inclusive"),
            click.option("--format", "fmt", type=FORMATS, default="html", show_default=True),
            click.option(
                "--out", type=click.Path(dir_okay=False, path_type=Path), help="file to write  [default: standard output]"
            ),
        )
    ):
        command = option(command)
    return command


@report.command("checks")
@_range_options
def checks(start: date, end: date, fmt: str, out: Path | None) -> None:
    """Every asset check evaluation in the range, from Dagster's event log; html and md end with the vendor-file ledger."""
    from k2_assets import report as reports

    date_range(start, end)
    # The csv check report holds check rows only: the ledger and the reconciliation are read where they are shown.
    files = _files(start, end) if fmt != "csv" else None
    exchange = _reconciled(start, end) if fmt != "csv" else None
    with dagster_instance() as instance:
        rows = reports.collect(instance, start, end, track=lambda records: progress(records, "check evaluations"))
    said = f"{len(rows)} check evaluations ({sum(not r.passed for r in rows)} failed)"
    _write(
        reports.render(rows, fmt, start, end, files, exchange),
        out,
        said + (f" and {len(files)} vendor files" if files is not None else ""),
    )


@report.command("files")
@_range_options
def files(start: date, end: date, fmt: str, out: Path | None) -> None:
    """The vendor-file ledger: per partition and file of its latest load, lines read, written, rejected and duplicate."""
    from k2_assets import report as reports

    date_range(start, end)
    rows = _files(start, end)
    _write(
        reports.render_files(rows, fmt, start, end),
        out,
        f"{len(rows)} vendor files ({sum(bool(f.file_error) for f in rows)} unreadable)",
    )


def _catalog():
    from k2_assets.core import catalog

    config = settings()
    return catalog.open_catalog(config.catalog_uri, config.warehouse)


def _files(start: date, end: date) -> list:
    from k2_assets import report as reports
    from k2_assets.core import catalog

    return reports.collect_files(catalog.ensure_table(_catalog(), "source_files"), start, end)


def _reconciled(start: date, end: date) -> list:
    from k2_assets import report_exchange

    return report_exchange.collect(_catalog(), start, end, track=lambda days: progress(days, "days reconciled"))


def _write(text: str, out: Path | None, said: str) -> None:
    if out:
        out.write_text(text)
        click.echo(f"k2: {said} written to {out}", err=True)
    else:
        sys.stdout.write(text)

"""Compliance report of asset check results, read from Dagster's event log, and of the vendor-file ledger.

The html and md check reports show, per day and market, K2's 1m bars against the exchange's own
(report_exchange), and end with the ledger (market.source_files): per partition and vendor file
of its latest load, what became of every line. csv holds one kind of row, so the ledger is its own report.

The range selects by partition (the exchange session date); an evaluation of an unpartitioned
check is placed by the date it ran. Each row: asset, partition, check, severity, passed, failed and
checked rows, a sample of failing rows, the Iceberg snapshot the check ran against, and the run.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime

import dagster as dg
from dagster import DagsterEventType, EventRecordsFilter

from k2_assets import report_exchange
from k2_assets.core.text import markdown_table

FILE_FIELDS = (
    "partition",
    "asset",
    "file",
    "sha256",
    "lines_read",
    "lines_written",
    "lines_rejected",
    "lines_duplicate",
    "file_error",
    "changed",
    "run_id",
    "loaded_at",
)
FIELDS = (
    "asset",
    "partition",
    "check",
    "severity",
    "passed",
    "failed_rows",
    "checked_rows",
    "snapshot_id",
    "run_id",
    "evaluated_at",
    "sample",
)


@dataclass(frozen=True)
class CheckRow:
    asset: str
    partition: str
    check: str
    severity: str
    passed: bool
    failed_rows: int | None
    checked_rows: int | None
    snapshot_id: str
    run_id: str
    evaluated_at: str
    sample: str  # JSON


def collect(instance: dg.DagsterInstance, start: date, end: date, track=lambda records: records) -> list[CheckRow]:
    """Every asset check evaluation whose partition (or run date) lies in [start, end]
    (`track`: a progress bar over the records)."""
    if end < start:
        raise ValueError(f"the range is reversed: {start} > {end}")
    records = instance.get_event_records(EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION), ascending=True)
    run_partitions: dict[str, str | None] = {}
    rows = []
    for record in track(records):
        entry = record.event_log_entry
        evaluation = entry.dagster_event.event_specific_data
        partition = evaluation.partition
        if partition is None and entry.run_id:
            if entry.run_id not in run_partitions:
                run = instance.get_run_by_id(entry.run_id)
                run_partitions[entry.run_id] = run.tags.get("dagster/partition") if run else None
            partition = run_partitions[entry.run_id]
        when = datetime.fromtimestamp(entry.timestamp, tz=UTC)
        day = _as_date(partition) or when.date()
        if not start <= day <= end:
            continue
        meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        rows.append(
            CheckRow(
                asset=evaluation.asset_key.to_user_string(),
                partition=partition or "",
                check=evaluation.check_name,
                severity=evaluation.severity.value,
                passed=evaluation.passed,
                failed_rows=meta.get("failed_rows"),
                checked_rows=meta.get("checked_rows"),
                snapshot_id=str(meta.get("snapshot_id", "")),
                run_id=entry.run_id or "",
                evaluated_at=when.isoformat(timespec="seconds"),
                sample=json.dumps(meta.get("sample", []), default=str),
            )
        )
    return sorted(rows, key=lambda r: (r.partition, r.asset, r.check, r.evaluated_at))


@dataclass(frozen=True)
class FileRow:
    partition: str
    asset: str
    file: str
    sha256: str
    lines_read: int
    lines_written: int
    lines_rejected: int
    lines_duplicate: int
    file_error: str
    changed: bool
    run_id: str
    loaded_at: str


def collect_files(ledger, start: date, end: date) -> list[FileRow]:
    """The ledger rows of each (asset, partition)'s latest load in [start, end]: what the tables hold now."""
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual

    rows = (
        ledger.scan(
            row_filter=And(
                GreaterThanOrEqual("partition_date", start.isoformat()), LessThanOrEqual("partition_date", end.isoformat())
            )
        )
        .to_arrow()
        .to_pylist()
    )
    latest: dict[tuple, tuple] = {}
    for row in rows:
        key = (row["source"], row["partition_date"])
        latest[key] = max(latest.get(key, (row["loaded_at"], row["run_id"])), (row["loaded_at"], row["run_id"]))
    current = [r for r in rows if latest[(r["source"], r["partition_date"])][1] == r["run_id"]]
    return sorted(
        (
            FileRow(
                partition=r["partition_date"].isoformat(),
                asset=r["source"],
                file=r["path"],
                sha256=r["sha256"] or "",
                lines_read=r["lines_read"],
                lines_written=r["lines_written"],
                lines_rejected=r["lines_rejected"],
                lines_duplicate=r["lines_duplicate"],
                file_error=r["file_error"] or "",
                changed=r["changed"],
                run_id=r["run_id"],
                loaded_at=r["loaded_at"].isoformat(timespec="seconds"),
            )
            for r in current
        ),
        key=lambda f: (f.partition, f.asset, f.file),
    )


def _as_date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def summarize(rows: list[CheckRow]) -> list[dict]:
    """Per asset and check: evaluations, passed, failed, and the latest outcome."""
    groups: dict[tuple, list[CheckRow]] = defaultdict(list)
    for row in rows:
        groups[(row.asset, row.check, row.severity)].append(row)
    return [
        {
            "asset": asset,
            "check": check,
            "severity": severity,
            "evaluations": len(group),
            "passed": sum(r.passed for r in group),
            "failed": sum(not r.passed for r in group),
            "failing_partitions": ", ".join(sorted({r.partition for r in group if not r.passed})),
        }
        for (asset, check, severity), group in sorted(groups.items())
    ]


def to_csv(rows: list, fields: tuple[str, ...] = FIELDS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return out.getvalue()


def to_markdown(rows: list[CheckRow], start: date, end: date, files: list[FileRow] | None = None) -> str:
    summary = summarize(rows)
    lines = [
        f"# K2 asset check report, {start} to {end}",
        "",
        f"{len(rows)} evaluations, {sum(not r.passed for r in rows)} failed.",
        "",
        "## Summary",
        "",
        markdown_table(
            ("asset", "check", "severity", "evaluations", "passed", "failed", "failing partitions"),
            (
                [s[k] for k in ("asset", "check", "severity", "evaluations", "passed", "failed", "failing_partitions")]
                for s in summary
            ),
        ),
        "",
        "## Details",
        "",
        markdown_table(
            ("partition", "asset", "check", "severity", "passed", "failed rows", "checked rows", "snapshot", "run", "sample"),
            (
                (
                    r.partition,
                    r.asset,
                    r.check,
                    r.severity,
                    "yes" if r.passed else "NO",
                    r.failed_rows,
                    r.checked_rows,
                    r.snapshot_id,
                    r.run_id[:8],
                    "" if r.passed else r.sample,
                )
                for r in rows
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def files_markdown(files: list[FileRow]) -> str:
    lines = [
        "## Vendor files",
        "",
        f"{len(files)} files; {sum(bool(f.file_error) for f in files)} could not be read; "
        f"{sum(f.changed for f in files)} changed since their previous load.",
        "",
        markdown_table(
            ("partition", "asset", "file", "sha256", "read", "written", "rejected", "duplicates", "error", "changed"),
            (
                (
                    f.partition,
                    f.asset,
                    f.file,
                    f.sha256[:12],
                    f.lines_read,
                    f.lines_written,
                    f.lines_rejected,
                    f.lines_duplicate,
                    f.file_error,
                    "yes" if f.changed else "",
                )
                for f in files
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def files_html(files: list[FileRow]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr class='{'bad' if f.file_error else 'ok'}'><td>{e(f.partition)}</td><td>{e(f.asset)}</td><td>{e(f.file)}</td>"
        f"<td><code>{e(f.sha256[:12])}</code></td><td class=n>{f.lines_read}</td><td class=n>{f.lines_written}</td>"
        f"<td class=n>{f.lines_rejected}</td><td class=n>{f.lines_duplicate}</td><td>{e(f.file_error)}</td>"
        f"<td>{'yes' if f.changed else ''}</td></tr>"
        for f in files
    )
    return (
        f"<h2>Vendor files</h2><p>Per vendor file of each partition's latest load: read = written + rejected + duplicates. "
        f"{sum(bool(f.file_error) for f in files)} files could not be read.</p>"
        "<table><tr><th>partition</th><th>asset</th><th>file</th><th>sha256</th><th>read</th><th>written</th><th>rejected</th>"
        f"<th>duplicates</th><th>error</th><th>changed</th></tr>{rows}</table>"
    )


def to_html(
    rows: list[CheckRow], start: date, end: date, files: list[FileRow] | None = None, exchange: list | None = None
) -> str:
    """One self-contained page: summary first, then every evaluation (failures first)."""
    e = html.escape
    failed = sum(not r.passed for r in rows)
    summary_rows = "".join(
        f"<tr class='{'bad' if s['failed'] else 'ok'}'><td>{e(s['asset'])}</td><td>{e(s['check'])}</td>"
        f"<td>{e(s['severity'])}</td><td class=n>{s['evaluations']}</td><td class=n>{s['passed']}</td>"
        f"<td class=n>{s['failed']}</td><td>{e(s['failing_partitions'])}</td></tr>"
        for s in summarize(rows)
    )
    detail_rows = "".join(
        f"<tr class='{'ok' if r.passed else 'bad'}'><td>{e(r.partition)}</td><td>{e(r.asset)}</td><td>{e(r.check)}</td>"
        f"<td>{e(r.severity)}</td>"
        f"<td>{'passed' if r.passed else 'FAILED'}</td><td class=n>{_n(r.failed_rows)}</td><td class=n>{_n(r.checked_rows)}</td>"
        f"<td><code>{e(r.snapshot_id)}</code></td><td><code>{e(r.run_id[:8])}</code></td>"
        f"<td>{'' if r.passed else _sample_html(r.sample)}</td></tr>"
        for r in sorted(rows, key=lambda r: (r.passed, r.partition, r.asset, r.check))
    )
    stats = (
        f"<span class=stat>{len(rows)} evaluations</span><span class=stat>{len(rows) - failed} passed</span>"
        f"<span class=stat>{failed} failed</span>"
    )
    summary_head = (
        "<tr><th>asset</th><th>check</th><th>severity</th><th>evaluations</th><th>passed</th><th>failed</th>"
        "<th>failing partitions</th></tr>"
    )
    detail_head = (
        "<tr><th>partition</th><th>asset</th><th>check</th><th>severity</th><th>result</th><th>failed rows</th>"
        "<th>checked rows</th><th>Iceberg snapshot</th><th>run</th><th>failing sample</th></tr>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>K2 asset check report {start} to {end}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0;width:100%}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} th{{background:#f0f0f0}}
td.n{{text-align:right}} tr.bad td{{background:#fdecea}} tr.ok td{{background:#f3faf3}} pre{{margin:0;font-size:12px}}
.stat{{display:inline-block;margin-right:2em;font-size:18px}}
</style></head><body>
<h1>K2 asset check report</h1>
<p>Partitions {start} to {end}; generated {datetime.now(UTC).isoformat(timespec="seconds")}.</p>
<p>{stats}</p>
<h2>Summary</h2>
<table>{summary_head}{summary_rows}</table>
<h2>Details</h2>
<table>{detail_head}{detail_rows}</table>
{report_exchange.to_html(exchange) if exchange else ""}
{files_html(files) if files is not None else ""}
</body></html>
"""


def _n(value) -> str:
    return "" if value is None else str(value)


def _sample_html(sample: str) -> str:
    """A failing evaluation's sample (JSON), folded away."""
    return "<details><summary>sample</summary><pre>" + html.escape(json.dumps(json.loads(sample), indent=1)) + "</pre></details>"


def render(
    rows: list[CheckRow], fmt: str, start: date, end: date, files: list[FileRow] | None = None, exchange: list | None = None
) -> str:
    """The check report; html and md add, per day and market, the reconciliation against the exchange's bars
    (`exchange`, report_exchange.DayMarket) and end with the ledger's `files`."""
    if fmt == "csv":
        return to_csv(rows)
    if fmt == "md":
        return (
            to_markdown(rows, start, end)
            + ("\n" + report_exchange.markdown(exchange) if exchange else "")
            + ("\n" + files_markdown(files) if files is not None else "")
        )
    if fmt == "html":
        return to_html(rows, start, end, files, exchange)
    raise ValueError(f"format must be html, csv or md, not {fmt!r}")


def render_files(files: list[FileRow], fmt: str, start: date, end: date) -> str:
    """The ledger alone."""
    if fmt == "csv":
        return to_csv(files, FILE_FIELDS)
    if fmt == "md":
        return f"# K2 vendor-file ledger, {start} to {end}\n\n" + files_markdown(files)
    if fmt == "html":
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>K2 vendor files</title></head>"
            f"<body>{files_html(files)}</body></html>\n"
        )
    raise ValueError(f"format must be html, csv or md, not {fmt!r}")

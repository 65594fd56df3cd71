"""The `k2` command line: one click group, one module per command."""

from __future__ import annotations

import sys

import click

from k2_assets.cli import backfill, broker, catalog, check, demo, feed, maintenance, query, recent, report, stream, writer
from k2_assets.cli.common import UserError
from k2_assets.core.settings import describe

SETTINGS_HELP = "Settings (environment variables; the options' defaults come from them):\n\n" + describe().replace("\n", "\n\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=SETTINGS_HELP)
def cli() -> None:
    """K2 market-data lakehouse: Dagster assets over Apache Iceberg."""


COMMANDS = (
    demo.demo,
    demo.demo_data,
    backfill.backfill,
    check.check,
    catalog.catalog,
    maintenance.maintenance,
    query.query,
    recent.recent,
    report.report,
    writer.writer,
    stream.stream,
    feed.feed,
    broker.broker,
)
for command in COMMANDS:
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run `k2`: a user error is one line on stderr with exit code 2, Ctrl-C is exit 130, never a traceback."""
    try:
        result = cli.main(args=argv, prog_name="k2", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("k2: interrupted", err=True)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handler
        click.echo("k2: interrupted", err=True)
        return 130
    except UserError as exc:
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "k2"
        click.echo(f"{where}: error: {exc.format_message()} (see `{where} --help`)", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"k2: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except Exception as exc:  # not the user's mistake (a store that is down, a bug): still one line, exit 1
        from k2_assets.core.text import one_line

        click.echo(f"k2: error ({type(exc).__name__}): {one_line(exc)}", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

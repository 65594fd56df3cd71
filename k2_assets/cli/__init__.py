"""The `k2` command line: one click group, one module per command."""

from __future__ import annotations

import sys

import click

from k2_assets.cli import demo, passthrough, recent, report
from k2_assets.cli.common import UserError
from k2_assets.core.settings import describe


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
             epilog="Settings (environment variables; the options' defaults come from them):\n\n" + describe().replace("\n", "\n\n"))
def cli() -> None:
    """K2 market-data lakehouse: Dagster assets over Apache Iceberg."""


for command in (demo.demo, demo.demo_data, recent.recent, report.report, *passthrough.COMMANDS):
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
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""What every `k2` command shares: the settings, one-line user errors, output formats and progress bars."""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import TypeVar

import click

from k2_assets.core.settings import Settings

T = TypeVar("T")
PROJECT_DIR = Path(__file__).resolve().parents[2]


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"k2: error: {self.format_message()}", file=file or sys.stderr)


@functools.cache
def settings() -> Settings:
    """The one configuration, read once per command from the environment (embedded defaults for the rest)."""
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def default(name: str):
    """An option default taken from the settings when the command runs (so `--help` reads no environment)."""
    return lambda: getattr(settings(), name)


class IsoDate(click.ParamType):
    name = "YYYY-MM-DD"

    def convert(self, value, param, ctx):
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a YYYY-MM-DD date", param, ctx)


class UtcTime(click.ParamType):
    name = "ISO-8601"

    def convert(self, value, param, ctx):
        from k2_assets.core.snapshots import parse_utc

        if isinstance(value, datetime):
            return value
        try:
            return parse_utc(value, param.opts[0] if param else "time")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DATE = IsoDate()
UTC_TIME = UtcTime()


def date_range(start: date, end: date) -> None:
    if end < start:
        raise UserError(f"the range is reversed: --start {start} is after --end {end}")


def progress(items: Iterable[T], label: str, length: int | None = None) -> Iterator[T]:
    """Items with a progress bar on stderr (a terminal shows the bar; a log gets the label once)."""
    with click.progressbar(
        items,
        length=length,
        label=label,
        file=sys.stderr,
        show_pos=True,
        item_show_func=lambda item: None if item is None else str(item),
    ) as bar:
        yield from bar


def dagster_home() -> Path:
    """DAGSTER_HOME (by default $K2_HOME/dagster), with K2's dagster.yaml unless the instance has its own."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings().home / "dagster")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # never overwrite an instance's own configuration
        shutil.copy(PROJECT_DIR / "dagster.yaml", home / "dagster.yaml")
    return home


def dagster_instance():
    """The Dagster instance the UI shows, so command-line runs appear there too."""
    import dagster as dg

    dagster_home()
    return dg.DagsterInstance.get()


def run_selection(assets: set, checks: set, partition_key: str | None, instance):
    """Run some of K2's assets and asset checks on one partition, in this process, recorded in `instance`."""
    from k2_assets.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=set(assets), asset_check_selection=set(checks))
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the progress bar speaks; the UI has the full log
    if assets:
        return job.execute_in_process(run_config=quiet, partition_key=partition_key, instance=instance, raise_on_error=False)
    # A job of checks alone has no partitions definition Dagster can resolve; the partition goes in as the run's tag.
    tags = {"dagster/partition": partition_key} if partition_key else {}
    return job.execute_in_process(run_config=quiet, tags=tags, instance=instance, raise_on_error=False)


class KafkaTopic(click.ParamType):
    """A Kafka topic name that leaves room for its `.dlq` dead-letter topic (Kafka allows 249 characters)."""

    name = "topic"
    pattern = re.compile(r"[A-Za-z0-9._-]{1,245}")

    def convert(self, value, param, ctx) -> str:
        if not self.pattern.fullmatch(value) or value in (".", ".."):
            self.fail(f"{value!r} is not a Kafka topic name: 1 to 245 letters, digits, '.', '_' or '-'", param, ctx)
        return value


def topic_option(**kwargs):
    """`--topic`: the trades topic a command reads or writes."""
    help = (
        "the trades topic (its dead letters are TOPIC.dlq)  "
        "[default: market.crypto.trades.binance, with --market um market.crypto.trades.binance_um]"
    )
    return click.option("--topic", type=KafkaTopic(), **{"help": help, **kwargs})


def market_option(help: str):
    """`--market spot|um`: the Binance market a command works on (k2_assets.core.binance_format.MARKETS)."""
    return click.option("--market", type=click.Choice(["spot", "um"]), default="spot", show_default=True, help=help)

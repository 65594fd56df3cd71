"""`k2 writer` that SIGKILLs itself at the stage K2_WRITER_CRASH_POINT names, for the tests that prove recovery from there.

K2_WRITER_CRASH_POINT=after_trades_commit python -m k2_assets.dev.crashing_writer [k2 writer options]
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import click

from k2_assets.cli.writer import run, writer
from k2_assets.core.live_writer import STAGES


def main() -> None:
    """Run `k2 writer`, killed without any cleanup as it reaches the stage K2_WRITER_CRASH_POINT names."""
    point = os.environ.get("K2_WRITER_CRASH_POINT", "")
    if point not in STAGES:
        sys.exit(f"crashing_writer: K2_WRITER_CRASH_POINT={point!r} is not a writer stage: one of {', '.join(STAGES)}")

    def crash(stage: str) -> None:
        if stage == point:
            os.kill(os.getpid(), signal.SIGKILL)

    command = click.Command(
        "crashing_writer",
        params=writer.params,
        callback=functools.partial(run, stage_hook=crash),
        help=f"`k2 writer`, SIGKILLed at {point}.",
    )
    command.main(prog_name="python -m k2_assets.dev.crashing_writer")


if __name__ == "__main__":
    main()

"""The `k2` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from k2_assets.core.settings import Settings, apply_defaults

PROJECT_DIR = Path(__file__).resolve().parents[1]
STOP_GRACE_SECONDS = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k2", description="K2 market-data lakehouse")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate demo data (if missing) and open the Dagster UI on 127.0.0.1")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=3000)
    demo.add_argument("--regenerate", action="store_true", help="write the demo data again even if it exists")

    data = commands.add_parser("demo-data", help="write demo vendor files (ASX CSV, Binance dumps) under $K2_HOME/data")
    data.add_argument("--out", type=Path, help="directory to write (default $K2_HOME/data)")
    data.add_argument("--seed", type=int, default=7)

    args = parser.parse_args(argv)
    apply_defaults()
    settings = Settings.from_env()
    if args.command == "demo-data":
        _write_demo_data(args.out or settings.home / "data", args.seed)
        return 0
    if args.command == "demo":
        return _demo(settings, args)
    return 2


def _write_demo_data(out: Path, seed: int) -> None:
    from k2_assets.core import demo

    print(f"k2: writing demo vendor files to {out} ...", flush=True)
    summary = demo.generate_demo_data(out, seed=seed)
    print(f"k2: {summary['total_rows']:,} rows in {len(summary['files'])} files ({summary['total_bad_rows']} deliberately bad rows)")


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    data_dir = settings.home / "data"
    defaults = (settings.asx_data_dir == data_dir / "asx", settings.binance_history_dir == data_dir / "binance")
    missing = not (settings.asx_data_dir / "reference-data" / "company_info.csv").exists() or not settings.binance_history_dir.is_dir()
    if args.regenerate or (missing and any(defaults)):
        _write_demo_data(data_dir, seed=7)
    for path, name in ((settings.asx_data_dir, "K2_ASX_DATA_DIR"), (settings.binance_history_dir, "K2_BINANCE_HISTORY_DIR")):
        if not path.exists():
            print(f"k2: warning: {name}={path} does not exist; its asset will fail until it does", file=sys.stderr)
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():  # never overwrite an instance's own configuration
        shutil.copy(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    command = [
        str(Path(sys.executable).with_name("dagster")), "dev",
        "-w", str(PROJECT_DIR / "workspace.yaml"), "-h", args.host, "-p", str(args.port),
    ]
    print(f"k2: Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # A process started from a non-interactive shell inherits SIGINT as ignored, and dagster dev
    # would then never stop: restore the default handler in the child before it starts.
    process = subprocess.Popen(
        command, cwd=dagster_home, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    stopping: list[float] = []

    def forward(signum, _frame):
        stopping.append(time.monotonic())
        process.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            return process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_SECONDS:
                print("k2: dagster dev did not stop in time; killing it", file=sys.stderr)
                process.kill()


if __name__ == "__main__":
    sys.exit(main())

"""The `k2` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from k2_assets.core.settings import Settings, apply_defaults

PROJECT_DIR = Path(__file__).resolve().parents[1]


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
    if args.regenerate or not (settings.asx_data_dir / "reference-data" / "company_info.csv").exists():
        if settings.asx_data_dir == data_dir / "asx" or args.regenerate:
            _write_demo_data(data_dir, seed=7)
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    command = [
        str(Path(sys.executable).with_name("dagster")), "dev",
        "-w", str(PROJECT_DIR / "workspace.yaml"), "-h", args.host, "-p", str(args.port),
    ]
    print(f"k2: Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    # A process started from a non-interactive shell inherits SIGINT as ignored, and dagster dev
    # would then never stop: restore the default handler in the child before it starts.
    process = subprocess.Popen(command, cwd=PROJECT_DIR, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def forward(signum, _frame):
        process.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return process.wait()
    finally:
        if process.poll() is None:
            process.kill()


if __name__ == "__main__":
    sys.exit(main())

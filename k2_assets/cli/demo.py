"""`k2 demo` and `k2 demo-data`: the whole pipeline on one machine, on generated vendor files."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import click

from k2_assets.cli.common import DATE, PROJECT_DIR, UserError, dagster_home, settings
from k2_assets.core.settings import DEFAULTS, Settings, apply_defaults
from k2_assets.supervisor import Supervisor


@click.command("demo")
@click.option("--host", default="127.0.0.1", show_default=True, help="address of the Dagster UI")
@click.option("--port", default=3000, show_default=True, help="port of the Dagster UI")
@click.option("--regenerate", is_flag=True, help="write the demo data again even if it exists")
@click.option("--symbols", default="BTCUSDT,ETHUSDT,BNBUSDT", show_default=True, help="live symbols of the local feed")
@click.option("--rate", default=200.0, show_default=True, help="live trades per second from the local feed")
def demo(host: str, port: int, regenerate: bool, symbols: str, rate: float) -> int:
    """Demo data (if missing), the live path (broker, local feed, producer) and `dagster dev`; Ctrl-C stops all."""
    return _demo(settings(), host=host, port=port, regenerate=regenerate, symbols=symbols, rate=rate)


@click.command("demo-data")
@click.option(
    "--out", type=click.Path(path_type=Path), help="directory to write asx/ and binance/ into  [default: $K2_HOME/data]"
)
@click.option("--seed", default=7, show_default=True, help="random seed of the generator")
@click.option("--asx-start", type=DATE, default="2014-03-10", show_default=True, help="first ASX session")
@click.option("--asx-days", default=5, show_default=True, help="ASX sessions (weekdays) to write")
@click.option("--binance-dates", default="2024-01-01,2024-01-02,2025-01-02", show_default=True, help="comma-separated UTC days")
@click.option("--binance-rows-per-day", default=20_000, show_default=True, help="Binance trades per symbol and day")
@click.option("--bad-row-rate", default=0.001, show_default=True, help="share of deliberately bad rows")
@click.option("--json", "as_json", is_flag=True, help="print the generator's summary (every file, its rows and bad rows) as JSON")
def demo_data(
    out: Path | None,
    seed: int,
    asx_start: date,
    asx_days: int,
    binance_dates: str,
    binance_rows_per_day: int,
    bad_row_rate: float,
    as_json: bool,
) -> None:
    """Write the demo vendor files (ASX CSVs, Binance dumps) in exactly the vendors' formats."""
    try:
        days = [date.fromisoformat(d.strip()) for d in binance_dates.split(",") if d.strip()]
    except ValueError:
        raise UserError(f"--binance-dates must be comma-separated YYYY-MM-DD dates, not {binance_dates!r}") from None
    _write_demo_data(
        out or settings().home / "data",
        seed=seed,
        asx_start=asx_start,
        asx_days=asx_days,
        binance_dates=days,
        binance_rows_per_day=binance_rows_per_day,
        bad_row_rate=bad_row_rate,
        as_json=as_json,
    )


def _write_demo_data(out: Path, as_json: bool = False, **options) -> None:
    from k2_assets.dev import demo

    click.echo(f"k2: writing demo vendor files to {out} ...", err=as_json)
    summary = demo.generate_demo_data(out, **options)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"k2: {summary['total_rows']:,} rows in {len(summary['files'])} files "
            f"({summary['total_bad_rows']} deliberately bad rows)"
        )


def _demo(settings: Settings, *, host: str, port: int, regenerate: bool, symbols: str, rate: float) -> int:
    from k2_assets.dev.broker import free_port

    data_dir = settings.home / "data"
    defaults = (settings.asx_data_dir == data_dir / "asx", settings.binance_history_dir == data_dir / "binance")
    missing = (
        not (settings.asx_data_dir / "reference-data" / "company_info.csv").exists() or not settings.binance_history_dir.is_dir()
    )
    if regenerate or (missing and any(defaults)):
        _write_demo_data(data_dir, seed=7)
    for path, name in ((settings.asx_data_dir, "K2_ASX_DATA_DIR"), (settings.binance_history_dir, "K2_BINANCE_HISTORY_DIR")):
        if not path.exists():
            print(f"k2: warning: {name}={path} does not exist; its asset will fail until it does", file=sys.stderr)
    # Every child gets the resolved settings: Dagster runs its code server and runs in DAGSTER_HOME, where a
    # relative default K2_HOME (./.k2) would name another home.
    apply_defaults(os.environ)
    home = dagster_home()
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    processes = Supervisor(logs)
    try:
        if "K2_KAFKA_BOOTSTRAP" not in os.environ or os.environ["K2_KAFKA_BOOTSTRAP"] == DEFAULTS["K2_KAFKA_BOOTSTRAP"]:
            broker_port = free_port()
            os.environ["K2_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{broker_port}"
            processes.start("broker", "the embedded broker", [*k2, "broker", "--port", str(broker_port)])
            _wait_for_port(broker_port, "the embedded Kafka broker")
        feed_port = free_port()
        processes.start(
            "feed",
            "the local Binance feed",
            [*k2, "feed", "--random-walk", symbols, "--port", str(feed_port), "--rate", str(rate)],
        )
        _wait_for_port(feed_port, "the local Binance feed")
        for name in ("K2_BINANCE_REST_URL", "K2_BINANCE_UM_REST_URL"):  # gap repair and klines ask the local exchange
            if os.environ.get(name, DEFAULTS[name]) == DEFAULTS[name]:
                os.environ[name] = f"http://127.0.0.1:{feed_port}"
        processes.start(
            "producer", "the producer", [*k2, "stream", "binance", "--symbols", symbols, "--url", f"ws://127.0.0.1:{feed_port}"]
        )
        print(
            f"k2: live trades {symbols} from the local feed on ws://127.0.0.1:{feed_port} into Kafka at "
            f"{os.environ['K2_KAFKA_BOOTSTRAP']}; logs in {logs}",
            flush=True,
        )
        print(f"k2: Dagster UI on http://{host}:{port} (Ctrl-C stops everything)", flush=True)
        dagster_dev = [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            str(PROJECT_DIR / "workspace.yaml"),
            "-h",
            host,
            "-p",
            str(port),
        ]
        processes.start("dagster", "dagster dev (webserver, daemon, code server, runs)", dagster_dev, log=False, cwd=home)
    except KeyboardInterrupt:
        processes.stop("Ctrl-C while starting")
        processes.kill_all()
        return 130
    except BaseException:
        processes.kill_all()
        raise
    return processes.run()


def _wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}")

"""`k2 demo` and `k2 demo-data`: the whole pipeline on one machine, on generated vendor files."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import click

from k2_assets.cli.common import settings
from k2_assets.core import kafka
from k2_assets.core.settings import DEFAULTS, Settings
from k2_assets.supervisor import Supervisor

PROJECT_DIR = Path(__file__).resolve().parents[2]


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
@click.option("--out", type=click.Path(path_type=Path), help="directory to write  [default: $K2_HOME/data]")
@click.option("--seed", default=7, show_default=True, help="random seed of the generator")
def demo_data(out: Path | None, seed: int) -> None:
    """Write the demo vendor files (ASX CSVs, Binance dumps) in exactly the vendors' formats."""
    _write_demo_data(out or settings().home / "data", seed)


def _write_demo_data(out: Path, seed: int) -> None:
    from k2_assets.core import demo

    print(f"k2: writing demo vendor files to {out} ...", flush=True)
    summary = demo.generate_demo_data(out, seed=seed)
    print(f"k2: {summary['total_rows']:,} rows in {len(summary['files'])} files ({summary['total_bad_rows']} deliberately bad rows)")


def _demo(settings: Settings, *, host: str, port: int, regenerate: bool, symbols: str, rate: float) -> int:
    data_dir = settings.home / "data"
    defaults = (settings.asx_data_dir == data_dir / "asx", settings.binance_history_dir == data_dir / "binance")
    missing = not (settings.asx_data_dir / "reference-data" / "company_info.csv").exists() or not settings.binance_history_dir.is_dir()
    if regenerate or (missing and any(defaults)):
        _write_demo_data(data_dir, seed=7)
    for path, name in ((settings.asx_data_dir, "K2_ASX_DATA_DIR"), (settings.binance_history_dir, "K2_BINANCE_HISTORY_DIR")):
        if not path.exists():
            print(f"k2: warning: {name}={path} does not exist; its asset will fail until it does", file=sys.stderr)
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():  # never overwrite an instance's own configuration
        shutil.copy(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    processes = Supervisor(logs)
    try:
        if "K2_KAFKA_BOOTSTRAP" not in os.environ or os.environ["K2_KAFKA_BOOTSTRAP"] == DEFAULTS["K2_KAFKA_BOOTSTRAP"]:
            broker_port = kafka.free_port()
            os.environ["K2_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{broker_port}"
            processes.start("broker", "the embedded broker", [*k2, "broker", "--port", str(broker_port)])
            _wait_for_port(broker_port, "the embedded Kafka broker")
        feed_port = kafka.free_port()
        processes.start("feed", "the local Binance feed", [*k2, "feed", "--random-walk", symbols, "--port", str(feed_port), "--rate", str(rate)])
        _wait_for_port(feed_port, "the local Binance feed")
        if os.environ.get("K2_BINANCE_REST_URL", DEFAULTS["K2_BINANCE_REST_URL"]) == DEFAULTS["K2_BINANCE_REST_URL"]:
            os.environ["K2_BINANCE_REST_URL"] = f"http://127.0.0.1:{feed_port}"  # gap repair asks the local exchange
        processes.start("producer", "the producer", [*k2, "stream", "binance", "--symbols", symbols, "--url", f"ws://127.0.0.1:{feed_port}"])
        print(f"k2: live trades {symbols} from the local feed on ws://127.0.0.1:{feed_port} into Kafka at "
              f"{os.environ['K2_KAFKA_BOOTSTRAP']}; logs in {logs}", flush=True)
        print(f"k2: Dagster UI on http://{host}:{port} (Ctrl-C stops everything)", flush=True)
        dagster_dev = [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(PROJECT_DIR / "workspace.yaml"), "-h", host, "-p", str(port)]
        processes.start("dagster", "dagster dev (webserver, daemon, code server, runs)", dagster_dev, log=False, cwd=dagster_home)
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



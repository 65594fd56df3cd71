"""The `k2` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from k2_assets.core import kafka
from k2_assets.core.settings import DEFAULTS, Settings, apply_defaults
from k2_assets.supervisor import Supervisor

PROJECT_DIR = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handler: no traceback
        print("k2: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k2", description="K2 market-data lakehouse")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate demo data (if missing) and open the Dagster UI on 127.0.0.1")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=3000)
    demo.add_argument("--regenerate", action="store_true", help="write the demo data again even if it exists")

    demo.add_argument("--symbols", default="BTCUSDT,ETHUSDT,BNBUSDT", help="live symbols of the local feed")
    demo.add_argument("--rate", type=float, default=200.0, help="live trades per second from the local feed")

    data = commands.add_parser("demo-data", help="write demo vendor files (ASX CSV, Binance dumps) under $K2_HOME/data")
    data.add_argument("--out", type=Path, help="directory to write (default $K2_HOME/data)")
    data.add_argument("--seed", type=int, default=7)

    commands.add_parser("stream", help="live producers: `k2 stream binance --symbols BTCUSDT,ETHUSDT`", add_help=False)
    commands.add_parser("feed", help="local Binance-format feed server (see `k2 feed --help`)", add_help=False)
    commands.add_parser("broker", help="run the embedded Kafka-compatible broker: `k2 broker [PORT]`", add_help=False)
    commands.add_parser("writer", help="drain Kafka into market.trades outside Dagster (see `k2 writer --help`)", add_help=False)
    commands.add_parser("query", help="DuckDB queries: `k2 query trades|bars|symbols|summary ...` (see `k2 query --help`)", add_help=False)
    recent = commands.add_parser("recent", help="a symbol's trades for the last N minutes (Iceberg + Kafka tail)")
    recent.add_argument("--symbol", required=True)
    recent.add_argument("--minutes", type=float, default=5)
    recent.add_argument("--format", choices=("table", "csv", "json"), default="table")
    recent.add_argument("--limit", type=int, default=50, help="rows to print (table format)")
    recent.add_argument("--until", type=_utc_time, default=None, help="end of the window, ISO-8601 (default: now)")
    recent.add_argument("--topic", default="market.crypto.trades.binance")
    recent.add_argument("--every", type=float, default=0, help="ask again every SECONDS from one Kafka reader, until Ctrl-C")

    report = commands.add_parser("report", help="reports: `k2 report checks|files --start DATE --end DATE --format html|csv|md`")
    report.add_argument("what", choices=("checks", "files"), help="checks: every check result, then the vendor-file ledger; files: the ledger")
    report.add_argument("--start", required=True, type=_date)
    report.add_argument("--end", required=True, type=_date)
    report.add_argument("--format", choices=("html", "csv", "md"), default="html")
    report.add_argument("--out", type=Path, help="file to write (default: standard output)")

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:  # these own their arguments
        apply_defaults()
        return PASS_THROUGH[argv[0]](argv[1:])
    args = parser.parse_args(argv)
    apply_defaults()
    settings = Settings.from_env()
    if args.command == "demo-data":
        _write_demo_data(args.out or settings.home / "data", args.seed)
        return 0
    if args.command == "demo":
        return _demo(settings, args)
    if args.command == "recent":
        return _recent(settings, args)
    if args.command == "report":
        return _report(settings, args)
    return 2


def _date(text: str):
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a YYYY-MM-DD date") from None


def _report(settings: Settings, args: argparse.Namespace) -> int:
    import dagster as dg

    from k2_assets import report

    os.environ.setdefault("DAGSTER_HOME", str(settings.home / "dagster"))
    if args.end < args.start:
        print(f"k2: the range is reversed: --start {args.start} is after --end {args.end}", file=sys.stderr)
        return 2
    from k2_assets.core import catalog

    # The csv check report holds check rows only: the ledger is read where it is shown.
    files = report.collect_files(catalog.ensure_table(catalog.open_catalog(settings.catalog_uri, settings.warehouse), "source_files"),
                                 args.start, args.end) if args.what == "files" or args.format != "csv" else None
    if args.what == "files":
        text = report.render_files(files, args.format, args.start, args.end)
        said = f"{len(files)} vendor files ({sum(bool(f.file_error) for f in files)} unreadable)"
    else:
        with dg.DagsterInstance.get() as instance:
            rows = report.collect(instance, args.start, args.end)
        text = report.render(rows, args.format, args.start, args.end, files)
        said = f"{len(rows)} check evaluations ({sum(not r.passed for r in rows)} failed)" + (f" and {len(files)} vendor files" if files is not None else "")
    if args.out:
        args.out.write_text(text)
        print(f"k2: {said} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _stream(argv: list[str]) -> int:
    if not argv or argv[0] != "binance":
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print("usage: k2 stream binance --symbols BTCUSDT,ETHUSDT [--url WS_BASE_URL] [--bootstrap HOST:PORT]\n"
              "live producers; one so far: `binance` (see `k2 stream binance --help`)", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from k2_assets.core import binance_stream

    return binance_stream.main(argv[1:])


def _feed(argv: list[str]) -> int:
    from k2_assets.core import feed_server

    return feed_server.main(argv)


def _broker(argv: list[str]) -> int:
    from k2_assets.core import kafka

    return kafka.main(argv)


def _writer(argv: list[str]) -> int:
    from k2_assets.core import live_writer

    return live_writer.main(argv)


def _query(argv: list[str]) -> int:
    from k2_assets.core import query

    return query.main(argv)


PASS_THROUGH = {"stream": _stream, "feed": _feed, "broker": _broker, "writer": _writer, "query": _query}


def _recent(settings: Settings, args: argparse.Namespace) -> int:
    from k2_assets.core import catalog
    from k2_assets.core.recent import RecentTrades, recent_trades

    table = catalog.ensure_table(catalog.open_catalog(settings.catalog_uri, settings.warehouse), "trades")
    if not args.every:
        _print_recent(recent_trades(table, settings.kafka_bootstrap, args.symbol, args.minutes, topic=args.topic, now=args.until), args)
        return 0
    import threading

    from k2_assets.core.stopping import Stopper

    stopping = threading.Event()
    Stopper("k2 recent", f"asking every {args.every:g} s for {args.symbol.upper()} (and its Kafka reader)", stopping.set).install()
    with RecentTrades(table, settings.kafka_bootstrap, topic=args.topic, keep_minutes=args.minutes) as recent:
        while not stopping.is_set():
            _print_recent(recent.query(args.symbol, args.minutes, now=args.until), args)
            sys.stdout.flush()
            stopping.wait(args.every)
    return 0


def _utc_time(text: str):
    from k2_assets.core.snapshots import parse_utc

    try:
        return parse_utc(text, "--until")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_recent(rows, args: argparse.Namespace) -> None:
    columns = ["exchange_timestamp", "symbol", "source_sequence", "side", "price", "quantity", "kafka_offset"]
    view = rows.select(columns)
    if args.format == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(view, sys.stdout.buffer)
    elif args.format == "json":
        import orjson

        for row in view.to_pylist():
            sys.stdout.buffer.write(orjson.dumps(row, default=str) + b"\n")
    else:
        print(f"{rows.num_rows} trades of {args.symbol.upper()} in the last {args.minutes:g} minutes")
        print(view.slice(max(0, view.num_rows - args.limit)).to_pandas().to_string(index=False))


def _write_demo_data(out: Path, seed: int) -> None:
    from k2_assets.core import demo

    print(f"k2: writing demo vendor files to {out} ...", flush=True)
    summary = demo.generate_demo_data(out, seed=seed)
    print(f"k2: {summary['total_rows']:,} rows in {len(summary['files'])} files ({summary['total_bad_rows']} deliberately bad rows)")


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    """Demo data, then the live path (broker, local feed, producer) and dagster dev; Ctrl-C stops all."""
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
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    processes = Supervisor(logs)
    try:
        if "K2_KAFKA_BOOTSTRAP" not in os.environ or os.environ["K2_KAFKA_BOOTSTRAP"] == DEFAULTS["K2_KAFKA_BOOTSTRAP"]:
            port = kafka.free_port()
            os.environ["K2_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{port}"
            processes.start("broker", "the embedded broker", [*k2, "broker", str(port)])
            _wait_for_port(port, "the embedded Kafka broker")
        feed_port = kafka.free_port()
        processes.start("feed", "the local Binance feed", [*k2, "feed", "--random-walk", args.symbols, "--port", str(feed_port), "--rate", str(args.rate)])
        _wait_for_port(feed_port, "the local Binance feed")
        if os.environ.get("K2_BINANCE_REST_URL", DEFAULTS["K2_BINANCE_REST_URL"]) == DEFAULTS["K2_BINANCE_REST_URL"]:
            os.environ["K2_BINANCE_REST_URL"] = f"http://127.0.0.1:{feed_port}"  # gap repair asks the local exchange
        processes.start("producer", "the producer", [*k2, "stream", "binance", "--symbols", args.symbols, "--url", f"ws://127.0.0.1:{feed_port}"])
        print(f"k2: live trades {args.symbols} from the local feed on ws://127.0.0.1:{feed_port} into Kafka at "
              f"{os.environ['K2_KAFKA_BOOTSTRAP']}; logs in {logs}", flush=True)
        print(f"k2: Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops everything)", flush=True)
        processes.start("dagster", "dagster dev (webserver, daemon, code server, runs)", [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(PROJECT_DIR / "workspace.yaml"),
                                    "-h", args.host, "-p", str(args.port)], log=False, cwd=dagster_home)
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


if __name__ == "__main__":
    sys.exit(main())

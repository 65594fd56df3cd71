"""`k2 writer`: the Kafka -> Iceberg writer outside Dagster, beside any other writers and the sensor.

Stdout is one JSON object a line, for the tools that drive it: {"ready": true, "resume_offsets": ...} once it has
partitions, {"written": ...} per committed batch, {"stopping": true, "committed_offsets": ...} at the end. Logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING

import click

from k2_assets.cli.common import UserError, default, market_option, settings, topic_option

if TYPE_CHECKING:
    from k2_assets.core.live_report import BatchReport
    from k2_assets.core.live_writer import LiveWriter, StageHook

log = logging.getLogger("k2.writer")


@click.command("writer")
@click.option("--bootstrap", default=default("kafka_bootstrap"), help="Kafka bootstrap servers  [default: K2_KAFKA_BOOTSTRAP]")
@market_option("the Binance market whose trades the topic carries: spot (exchange BINANCE) or um (USD-M futures, BINANCE_UM)")
@topic_option()
@click.option(
    "--seconds", type=click.FloatRange(min=0), default=float("inf"), help="stop after this long  [default: until stopped]"
)
@click.option(
    "--max-batch-rows", type=click.IntRange(min=1), default=250_000, show_default=True, help="messages in one micro-batch at most"
)
@click.option(
    "--session-timeout-ms",
    type=int,
    default=default("kafka_session_timeout_ms"),
    help="how long a dead or paused writer keeps its partitions (the broker's minimum or more)  "
    "[default: K2_KAFKA_SESSION_TIMEOUT_MS]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=default("writer_metrics_port"),
    help="serve Prometheus /metrics on PORT (0: off)  [default: K2_WRITER_METRICS_PORT]",
)
def writer(
    bootstrap: str,
    market: str,
    topic: str | None,
    seconds: float,
    max_batch_rows: int,
    session_timeout_ms: int,
    metrics_port: int,
) -> int:
    """Drain the topic into market.trades until interrupted (or --seconds), beside any other writers."""
    return run(bootstrap, topic, seconds, max_batch_rows, session_timeout_ms, metrics_port, market=market)


def run(
    bootstrap: str,
    topic: str | None,
    seconds: float,
    max_batch_rows: int,
    session_timeout_ms: int,
    metrics_port: int,
    stage_hook: StageHook | None = None,
    market: str = "spot",
) -> int:
    """`k2 writer`'s work, with LiveWriter's optional stage_hook; a writer that meets an error is rebuilt from the table."""
    from k2_assets.core import catalog
    from k2_assets.core.binance_format import MARKETS
    from k2_assets.core.live_writer import LiveWriter
    from k2_assets.core.metrics import WriterMetrics, serve
    from k2_assets.core.stopping import Stopper
    from k2_assets.core.text import one_line

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = settings()
    cat = catalog.open_catalog(config.catalog_uri, config.warehouse)
    metrics = WriterMetrics()
    if metrics_port:
        try:
            serve(metrics.registry, metrics_port)
        except OSError as exc:
            raise UserError(f"cannot serve /metrics on port {metrics_port}: {exc.strerror or exc}") from None
    chosen = MARKETS[market]
    topic = topic or chosen.topic
    deadline = time.monotonic() + seconds
    stopping = threading.Event()
    live: LiveWriter | None = None

    def stop() -> None:
        stopping.set()
        if live is not None:
            live.stop()

    Stopper(
        "k2 writer", f"the writer of {topic} (a batch being committed finishes; the next writer resumes after it)", stop
    ).install()

    while not stopping.is_set() and time.monotonic() < deadline:
        try:
            if live is None:
                tables = [catalog.ensure_table(cat, name) for name in ("trades", "rejected", "sequence_gaps")]
                live = LiveWriter(
                    tables[0],
                    tables[1],
                    bootstrap,
                    market=chosen,
                    topic=topic,
                    max_batch_rows=max_batch_rows,
                    metrics=metrics,
                    gaps=tables[2],
                    session_timeout_ms=session_timeout_ms,
                    stage_hook=stage_hook,
                )
                _say({"ready": True, "resume_offsets": live.position})
            live.drain(min(5.0, max(0.0, deadline - time.monotonic())), on_batch=_report)
            live.reconcile_gaps(detected_by="k2_writer")
        except Exception as exc:  # noqa: BLE001 - a writer that meets an error is rebuilt from the table's offsets
            if stopping.is_set():
                break
            log.error("writer rebuilt from the table's offsets after: %s", one_line(exc))
            if live is not None:
                _close_quietly(live)
                live = None
            time.sleep(1.0)
    if live is not None:
        _say({"stopping": True, "committed_offsets": live.committed})
        _close_quietly(live)
    return 0


def _report(batch: BatchReport) -> None:
    _say(
        {
            "written": batch.written,
            "rejected": batch.rejected,
            "duplicates": batch.duplicates,
            "snapshot_id": batch.snapshot_id,
            "offsets": batch.offset_ranges,
        }
    )


def _say(line: dict) -> None:
    print(json.dumps(line), flush=True)


def _close_quietly(live: LiveWriter) -> None:
    try:
        live.close()
    except Exception as exc:  # noqa: BLE001 - the table's offsets are the truth; the group's are for lag only
        log.warning("closing the writer: %s", exc)

"""What a committed micro-batch reports (the sensor and `k2 writer` show it) and the writer metrics it moves."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core.metrics import WriterMetrics


@dataclass
class BatchReport:
    """One committed micro-batch, as the sensor reports it."""

    consumed: int
    written: int
    duplicates: int
    rejected: int
    dead_lettered: int  # producer dead letters moved to market.rejected (not counted in consumed)
    sequence_events: dict[str, int]  # in_order, gap, duplicate, out_of_order, ... as the tracker saw the batch
    offset_ranges: dict[int, tuple[int, int]]  # partition -> [first, last] offsets consumed
    snapshot_id: int | None
    partitions: dict[str, int]  # trade_date -> rows written
    latency_seconds: dict[str, float]  # exchange time -> committed, p50 / max over the batch
    committed_at: datetime


def record(metrics: WriterMetrics, report: BatchReport, seconds: float) -> None:
    """Count one committed batch, decoded and committed in `seconds`, in the writer's metrics."""
    m = metrics
    m.batch_seconds.observe(seconds)
    m.consumed.inc(report.consumed)
    m.written.inc(report.written)
    m.rejected.inc(report.rejected + report.dead_lettered)
    m.duplicates.inc(report.duplicates)
    for event, count in report.sequence_events.items():
        m.sequence_events.labels(event).inc(count)
    if report.latency_seconds:
        m.freshness.set(report.latency_seconds["p95"])
    m.last_commit_time.set(report.committed_at.timestamp())


def rows_per_day(rows: pa.Table) -> dict[str, int]:
    """Trade date (ISO) -> rows written."""
    if not rows.num_rows:
        return {}
    counts = pc.value_counts(rows.column("trade_date"))
    return {item["values"].isoformat(): item["counts"] for item in counts.to_pylist()}


def lags(rows: pa.Table, committed: datetime) -> np.ndarray:
    """Per row, seconds from the exchange's event time (Binance E, else the trade time) to the commit."""
    trade_ms = pc.divide(rows.column("exchange_timestamp").cast(pa.int64()), 1000)
    event_ms = pc.cast(pc.map_lookup(rows.column("vendor_data"), "event_time", "first"), pa.int64(), safe=False)
    ms = pc.coalesce(event_ms, trade_ms).to_numpy(zero_copy_only=False).astype(np.float64)
    return committed.timestamp() - ms / 1e3


def latency(rows: pa.Table, committed: datetime) -> dict[str, float]:
    """Freshness of a committed batch: p50, p95 and max of its rows' lags."""
    if not rows.num_rows:
        return {}
    lag = lags(rows, committed)
    return {"p50": float(np.percentile(lag, 50)), "p95": float(np.percentile(lag, 95)), "max": float(lag.max())}

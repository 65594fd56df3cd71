import time
import warnings
from datetime import date, timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from dagster_duckdb import DuckDBResource
from prometheus_client import CollectorRegistry
from pyiceberg.expressions import EqualTo, GreaterThan
from pyiceberg.table import Table

from k2_assets.core import rollups, schemas, snapshots, writer
from k2_assets.core.metrics import RollupMetrics
from k2_assets.defs.partitions import trade_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.automation import AUTOMATION
from k2_assets.defs.rollups.chart import markdown_charts
from k2_assets.defs.run_metrics import ROLLUPS, publish


class RollupConfig(dg.Config):
    """Time travel: compute the bars from market.trades as it was at a snapshot id or a moment (UTC ISO)."""

    as_of_snapshot_id: int | None = None
    as_of: str | None = None


def trades_snapshot(trades: Table, config: RollupConfig) -> int | None:
    """The trades snapshot to read: the one named, the one current at `as_of`, or the current one."""
    if config.as_of_snapshot_id is not None:
        if trades.snapshot_by_id(config.as_of_snapshot_id) is None:
            raise ValueError(f"market.trades has no snapshot {config.as_of_snapshot_id}")
        return config.as_of_snapshot_id
    if config.as_of:
        moment = snapshots.parse_utc(config.as_of, "as_of")
        snapshot = snapshots.snapshot_at(trades, moment)
        if snapshot is None:
            raise ValueError(f"market.trades has no snapshot at or before {moment.isoformat()}")
        return snapshot.snapshot_id
    current = trades.current_snapshot()
    return current.snapshot_id if current else None


def _scan(table: Table, where, snapshot_id: int | None, columns=("*",)) -> pa.Table:
    return table.scan(row_filter=where, snapshot_id=snapshot_id, selected_fields=columns).to_arrow()


def _fill_context(trades: Table, day: date, snapshot_id: int | None, symbols: list[tuple[str, str]]):
    """Previous closes (last trade of the day before) and which days are complete (later trades exist)."""
    previous_close, complete = {}, set()
    filled = [(e, s) for e, s in symbols if rollups.FILL_EMPTY_BARS.get(e)]
    if not filled:
        return previous_close, complete
    before = _scan(
        trades,
        EqualTo("trade_date", (day - timedelta(days=1)).isoformat()),
        snapshot_id,
        ("exchange", "symbol", "exchange_timestamp", "source_sequence", "price"),
    )
    if before.num_rows:
        last = before.sort_by([("exchange_timestamp", "descending"), ("source_sequence", "descending")])
        seen = set()
        for row in last.to_pylist():
            key = (row["exchange"], row["symbol"])
            if key not in seen:
                seen.add(key)
                previous_close[key] = row["price"]
    later = _scan(trades, GreaterThan("trade_date", day.isoformat()), snapshot_id, ("exchange", "symbol"))
    complete = set(zip(later.column("exchange").to_pylist(), later.column("symbol").to_pylist())) & set(filled)
    return previous_close, complete


def _write(
    iceberg: IcebergResource, interval: str, day: date, bars: pa.Table, source_snapshot: int | None, as_of: bool
) -> int | None:
    table = iceberg.table(f"ohlcv_{interval}")
    result = writer.replace_rows(
        table,
        bars,
        EqualTo("trade_date", day.isoformat()),
        properties={"k2.source": f"ohlcv_{interval}", "k2.trades_snapshot_id": str(source_snapshot), "k2.as_of": str(as_of)},
    )
    return result.snapshot_id


def _metadata(bars: pa.Table, interval: str, source_snapshot, snapshot_id, config: RollupConfig) -> dict:
    per_exchange = pc.value_counts(bars.column("exchange")).to_pylist() if bars.num_rows else []
    return {
        "dagster/row_count": bars.num_rows,
        "bars_by_exchange": dg.MetadataValue.json({c["values"]: c["counts"] for c in per_exchange}),
        "filled_bars": int(pc.sum(bars.column("filled")).as_py() or 0) if bars.num_rows else 0,
        "symbols": bars.num_rows and pc.count_distinct(bars.column("symbol")).as_py(),
        "trades_snapshot_id": str(source_snapshot),
        "as_of": config.as_of or (str(config.as_of_snapshot_id) if config.as_of_snapshot_id else "current"),
        "snapshot_id": str(snapshot_id),
        "table": f"market.ohlcv_{interval}",
        "chart": dg.MetadataValue.md(markdown_charts(bars)),
    }


def matches_raw(trades: pa.Table, bars: pa.Table, interval: str, con) -> tuple[bool, dict]:
    """Whether every traded bar equals the bar recomputed straight from the raw trades, and the comparison's metadata."""
    if interval == "1d":
        raw = rollups.derive(_raw_1m_as_bars(trades, con), "1d", 0, con=con)
    else:
        raw = rollups.bars_from_trades(trades, interval, con)
    traded = bars.filter(pc.greater(pc.fill_null(bars.column("trade_count_all"), bars.column("trade_count")), 0))
    # A minute without a price-forming trade shows the previous close; raw trades give it no price.
    unpriced = pc.equal(traded.column("trade_count"), 0)
    for name in ("open", "high", "low", "close"):
        i = traded.schema.get_field_index(name)
        traded = traded.set_column(i, name, pc.if_else(unpriced, pa.scalar(None, traded.schema.field(i).type), traded.column(i)))
    keys = [
        "exchange",
        "symbol",
        "bar_start",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "quote_volume",
        "trade_count",
        "taker_buy_volume",
        "first_sequence",
        "last_sequence",
        "volume_all",
        "trade_count_all",
    ]
    mine = traded.select(keys).cast(pa.schema([traded.schema.field(k) for k in keys]))
    theirs = raw.select(keys)
    theirs = pa.table({k: theirs.column(k).cast(mine.schema.field(k).type) for k in keys})
    a = set(map(tuple, zip(*(mine.column(k).to_pylist() for k in keys))))
    b = set(map(tuple, zip(*(theirs.column(k).to_pylist() for k in keys))))
    differing = sorted(a ^ b, key=str)
    return not differing, {
        "bars_compared": len(a),
        "bars_differing": len(differing),
        "sample": dg.MetadataValue.json([str(d) for d in differing[:5]]),
    }


def _raw_1m_as_bars(trades: pa.Table, con) -> pa.Table:
    raw = rollups.bars_from_trades(trades, "1m", con)
    return raw.append_column("filled", pa.repeat(pa.scalar(False), raw.num_rows))


def _publish(context: dg.AssetExecutionContext, interval: str, bars: pa.Table, started: float) -> None:
    """Bars written and time taken, pushed to the Pushgateway (run_metrics)."""
    metrics = RollupMetrics(CollectorRegistry())
    filled = int(pc.sum(bars.column("filled")).as_py() or 0) if bars.num_rows else 0
    metrics.record(interval, bars.num_rows, filled, time.monotonic() - started)
    publish(context, ROLLUPS, metrics.registry)


def _rollup_1m(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig
) -> dg.MaterializeResult:
    started = time.monotonic()
    day = date.fromisoformat(context.partition_key)
    trades = iceberg.table("trades")
    snapshot = trades_snapshot(trades, config)
    rows = (
        _scan(trades, EqualTo("trade_date", day.isoformat()), snapshot)
        if snapshot
        else schemas.arrow_schema(schemas.TRADE).empty_table()
    )
    symbols = list(set(zip(rows.column("exchange").to_pylist(), rows.column("symbol").to_pylist()))) if rows.num_rows else []
    previous_close, complete = _fill_context(trades, day, snapshot, symbols) if snapshot else ({}, set())
    with duckdb.get_connection() as con:
        bars = (
            rollups.one_minute_bars(
                rows, previous_close=previous_close, complete_days=complete, snapshot_id=snapshot or 0, con=con
            )
            if rows.num_rows
            else _empty_bars()
        )
        written = _write(iceberg, "1m", day, bars, snapshot, bool(config.as_of or config.as_of_snapshot_id))
    _publish(context, "1m", bars, started)
    return dg.MaterializeResult(metadata=_metadata(bars, "1m", snapshot, written, config))


def _empty_bars() -> pa.Table:
    return schemas.arrow_schema(schemas.OHLCV).empty_table()


def _rollup_derived(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig, interval: str
) -> dg.MaterializeResult:
    started = time.monotonic()
    day = date.fromisoformat(context.partition_key)
    minute = _scan(iceberg.table("ohlcv_1m"), EqualTo("trade_date", day.isoformat()), None)
    # The trades snapshot the 1m bars were computed from: the derived bars and their proof use the same one.
    snapshots = pc.unique(minute.column("source_snapshot_id")).to_pylist() if minute.num_rows else []
    snapshot = snapshots[0] if snapshots else None
    with duckdb.get_connection() as con:
        bars = rollups.derive(minute, interval, snapshot or 0, con=con) if minute.num_rows else _empty_bars()
        written = _write(iceberg, interval, day, bars, snapshot, bool(config.as_of or config.as_of_snapshot_id))
    _publish(context, interval, bars, started)
    return dg.MaterializeResult(metadata=_metadata(bars, interval, snapshot, written, config))


def _mapping() -> dg.TimeWindowPartitionMapping:
    # Weekends have bars partitions but no ASX sessions; Binance days start in 2017.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.TimeWindowPartitionMapping(allow_nonexistent_upstream_partitions=True)


def _spec(interval: str, upstream) -> dict:
    return dict(
        name=f"ohlcv_{interval}",
        partitions_def=trade_days,
        group_name="rollups",
        kinds={"duckdb", "iceberg"},
        automation_condition=AUTOMATION,
        # Same key, same trade_date: ASX sessions and Binance days both label their windows in UTC.
        deps=[dg.AssetDep(u, partition_mapping=_mapping()) for u in upstream],
    )


@dg.asset(
    **_spec("1m", ["asx_trades", "binance_trades_history", "binance_trades", "binance_um_trades_history", "binance_um_trades"])
)
def ohlcv_1m(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig
) -> dg.MaterializeResult:
    """1-minute OHLCV bars per exchange and symbol from market.trades (DuckDB), Binance's empty minutes filled."""
    return _rollup_1m(context, iceberg, duckdb, config)


@dg.asset(**_spec("5m", ["ohlcv_1m"]))
def ohlcv_5m(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig
) -> dg.MaterializeResult:
    """5-minute OHLCV bars derived from the 1-minute bars."""
    return _rollup_derived(context, iceberg, duckdb, config, "5m")


@dg.asset(**_spec("1h", ["ohlcv_1m"]))
def ohlcv_1h(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig
) -> dg.MaterializeResult:
    """1-hour OHLCV bars derived from the 1-minute bars."""
    return _rollup_derived(context, iceberg, duckdb, config, "1h")


@dg.asset(**_spec("1d", ["ohlcv_1m"]))
def ohlcv_1d(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, duckdb: DuckDBResource, config: RollupConfig
) -> dg.MaterializeResult:
    """Daily OHLCV bars per exchange session, derived from the 1-minute bars."""
    return _rollup_derived(context, iceberg, duckdb, config, "1d")

from datetime import date

import dagster as dg
from pyiceberg.expressions import And, NotNull

from k2_assets.core import binance_history as dumps
from k2_assets.core.writer import partition_filter
from k2_assets.defs.binance.resources import BinanceHistoryResource
from k2_assets.defs.loading import check_specs, write_partition
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource


@dg.asset(
    partitions_def=binance_days,
    check_specs=check_specs("binance_trades_history", "trades"),
    group_name="binance",
    kinds={"iceberg", "python"},
)
def binance_trades_history(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, binance_history: BinanceHistoryResource
) -> dg.MaterializeResult:
    """Binance trades of one UTC day, from the public trade and aggTrade dumps into market.trades."""
    day = date.fromisoformat(context.partition_key)
    batch, notes = dumps.load_day(binance_history.path(), day, source="binance_trades_history")
    for note in notes:
        context.log.warning(note)
    live = partition_filter(dumps.EXCHANGE, day)
    return write_partition(
        context,
        iceberg,
        batch,
        kind="trades",
        exchange=dumps.EXCHANGE,
        session_date=day,
        # History owns the day's file-sourced rows; rows that came live from Kafka stay, and a
        # history row already among them is not written a second time.
        where=partition_filter(dumps.EXCHANGE, day, batch_only=True),
        keep=And(live, NotNull("kafka_topic")),
        extra_metadata={"skipped_files": dg.MetadataValue.json(notes)},
    )


kafka_topic = dg.AssetSpec(
    key=["kafka", "market_crypto_trades_binance"],
    description="Kafka topic market.crypto.trades.binance: v2 trades produced from Binance's WebSocket trade stream.",
    group_name="binance",
    kinds={"kafka"},
)

binance_trades = dg.AssetSpec(
    key="binance_trades",
    deps=[kafka_topic],
    description="Binance trades arriving live (WebSocket -> Kafka -> sensor micro-batches) in market.trades, exactly once.",
    partitions_def=binance_days,
    group_name="binance",
    kinds={"iceberg", "kafka"},
)

"""The exchange's own 1m bars, kept to prove K2's bars equal them (`matches_exchange_bars`)."""

from datetime import date

import dagster as dg
import pyarrow as pa
from pyiceberg.expressions import And, EqualTo, In

from k2_assets.core import klines
from k2_assets.core.binance_format import BY_EXCHANGE
from k2_assets.core.binance_rest import ExchangeError
from k2_assets.core.decode import Batch
from k2_assets.core.source_files import SourceFile
from k2_assets.defs.binance.resources import BinanceHistoryResource, BinanceRestResource
from k2_assets.defs.loading import write_partition
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rollups.automation import AUTOMATION

EXCHANGES = list(BY_EXCHANGE)


@dg.asset(
    partitions_def=binance_days,
    group_name="binance",
    kinds={"iceberg", "python"},
    deps=["binance_trades_history", "binance_trades", "binance_um_trades_history", "binance_um_trades"],
    automation_condition=AUTOMATION,
)
def binance_klines(
    context: dg.AssetExecutionContext,
    iceberg: IcebergResource,
    binance_history: BinanceHistoryResource,
    binance_rest: BinanceRestResource,
) -> dg.MaterializeResult:
    """Binance's own 1m bars of one UTC day into market.exchange_bars: kline dumps, else the REST API's closed minutes."""
    day = date.fromisoformat(context.partition_key)
    batch = klines.load_day(binance_history.path(), day, source="binance_klines")
    fetched, failed = _fetch_missing(context, iceberg, binance_rest, day, batch)
    if fetched:
        # each REST answer is in the ledger like a file: every bar it gave, written
        answers = [SourceFile(t.column("source_file")[0].as_py(), read=t.num_rows, written=t.num_rows) for t in fetched]
        batch = Batch(pa.concat_tables([batch.rows, *fetched]), batch.rejected, [*batch.files, *answers])
    where = And(EqualTo("trade_date", day.isoformat()), In("exchange", EXCHANGES))
    return write_partition(
        context,
        iceberg,
        batch,
        kind="exchange_bars",
        exchange=EXCHANGES[0],
        session_date=day,
        where=where,
        stored_where=where,
        extra_metadata={
            "bars_from_rest": sum(t.num_rows for t in fetched),
            "rest_failures": dg.MetadataValue.json(failed),
        },
    )


def _fetch_missing(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, rest: BinanceRestResource, day: date, batch: Batch
) -> tuple[list[pa.Table], dict[str, str]]:
    """The REST bars of every symbol K2 holds trades of on `day` and no dump covers (the live days)."""
    trades = iceberg.table("trades").scan(
        row_filter=And(EqualTo("trade_date", day.isoformat()), In("exchange", EXCHANGES)), selected_fields=("exchange", "symbol")
    )
    traded = {(r["exchange"], r["symbol"]) for r in trades.to_arrow().group_by(["exchange", "symbol"]).aggregate([]).to_pylist()}
    dumped = set(zip(batch.rows.column("exchange").to_pylist(), batch.rows.column("symbol").to_pylist()))
    fetched, failed = [], {}
    for exchange, symbol in sorted(traded - dumped):
        try:
            bars = klines.fetch_day(rest.url(BY_EXCHANGE[exchange]), exchange, symbol, day, api_key=rest.api_key or None)
        except ExchangeError as exc:
            failed[f"{exchange}:{symbol}"] = str(exc)
            context.log.warning(f"{exchange} {symbol} {day}: the exchange's bars could not be fetched ({exc})")
            continue
        if bars.num_rows:
            fetched.append(bars)
    return fetched, failed

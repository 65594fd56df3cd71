from datetime import date, time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core import asx
from k2_assets.core.writer import partition_filter
from k2_assets.defs.asx.resources import AsxFilesResource
from k2_assets.defs.loading import write_partition
from k2_assets.defs.partitions import asx_sessions
from k2_assets.defs.resources import IcebergResource

REGULAR_HOURS = (time(10, 0), time(16, 12))  # continuous trading plus the closing auction, Sydney time


def _load(
    context: dg.AssetExecutionContext, iceberg: IcebergResource, files: AsxFilesResource, kind: str
) -> dg.MaterializeResult:
    session_date = date.fromisoformat(context.partition_key)
    batch = asx.load_session(files.path(), session_date, kind, source=context.asset_key.to_user_string())
    return write_partition(
        context,
        iceberg,
        batch,
        kind=kind,
        exchange=asx.EXCHANGE,
        session_date=session_date,
        # The asset owns every ASX row of the session: a rerun leaves nothing of an earlier load behind.
        where=partition_filter(asx.EXCHANGE, session_date),
        extra_metadata={"outside_regular_hours": outside_regular_hours(batch.rows)},
    )


def outside_regular_hours(rows: pa.Table) -> int:
    """Rows before 10:00 or after 16:12 Sydney time (pre-open crossings, late reports): kept, but counted."""
    local = pc.local_timestamp(rows.column("exchange_timestamp").cast(pa.timestamp("us", tz=asx.TIMEZONE)))
    clock = pc.cast(local, pa.time64("us"))
    inside = pc.and_(
        pc.greater_equal(clock, pa.scalar(REGULAR_HOURS[0], pa.time64("us"))),
        pc.less_equal(clock, pa.scalar(REGULAR_HOURS[1], pa.time64("us"))),
    )
    return rows.num_rows - pc.sum(inside).as_py() if rows.num_rows else 0


@dg.asset(
    partitions_def=asx_sessions,
    group_name="asx",
    kinds={"iceberg", "python"},
)
def asx_trades(context: dg.AssetExecutionContext, iceberg: IcebergResource, asx_files: AsxFilesResource) -> dg.MaterializeResult:
    """ASX trades of one Sydney session, from the vendor's per-company CSV files into market.trades."""
    return _load(context, iceberg, asx_files, "trades")


@dg.asset(
    partitions_def=asx_sessions,
    group_name="asx",
    kinds={"iceberg", "python"},
)
def asx_quotes(context: dg.AssetExecutionContext, iceberg: IcebergResource, asx_files: AsxFilesResource) -> dg.MaterializeResult:
    """ASX top-of-book quotes of one Sydney session, from the vendor's CSV files into market.quotes."""
    return _load(context, iceberg, asx_files, "quotes")

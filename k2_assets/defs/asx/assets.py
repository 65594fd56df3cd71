from datetime import date

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core import asx
from k2_assets.core.writer import partition_filter
from k2_assets.defs.asx.resources import AsxFilesResource
from k2_assets.defs.loading import write_partition
from k2_assets.defs.partitions import asx_sessions
from k2_assets.defs.resources import IcebergResource


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
        extra_metadata=by_class(batch.rows) if kind == "trades" else None,
    )


def by_class(rows: pa.Table) -> dict:
    """How many trades of the session each class holds (docs/asx.md): off-market trades are kept but form no price."""
    counts = pc.value_counts(rows.column("trade_class")).to_pylist() if rows.num_rows else []
    return {
        "trades_by_class": dg.MetadataValue.json(
            {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: str(c["values"]))}
        ),
        "price_forming_trades": int(pc.sum(rows.column("price_forming")).as_py() or 0) if rows.num_rows else 0,
    }


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

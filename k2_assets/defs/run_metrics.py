"""Short Dagster runs (loads, rollups, gap repair, maintenance) publish their metrics through a Prometheus Pushgateway.

A run's process ends before Prometheus could scrape it, so each asset (or op) fills a registry of its
own and, when it succeeds, pushes it (pushadd) to K2_PUSHGATEWAY_URL under job=<one of the jobs below>
and the grouping key {asset=<asset name>} (an op that is no asset: {op=<op name>}): bounded labels,
never a partition or a run id. The gateway keeps the last successful run's values per group, and its
push_time_seconds says when that was. Unset: no-op. A gateway that is down costs a warning in the
run's log, never the run. (The maintenance ops push also when they failed, and each table's failures
under {op, table}.)
"""

from __future__ import annotations

import dagster as dg
from prometheus_client import CollectorRegistry

from k2_assets.core.metrics import push

LOADS = "k2_loads"  # asx_trades, asx_quotes, binance_trades_history
ROLLUPS = "k2_rollups"  # ohlcv_1m, ohlcv_5m, ohlcv_1h, ohlcv_1d
GAP_REPAIR = "k2_gap_repair"  # binance_trades (the repair run of a day)
MAINTENANCE = "k2_maintenance"  # table maintenance ops
BACKUP = "k2_backup"  # the catalog backup op (and `k2 catalog backup`)
JOBS = (LOADS, ROLLUPS, GAP_REPAIR, MAINTENANCE, BACKUP)


def grouping_key(context: dg.OpExecutionContext | dg.AssetExecutionContext) -> dict[str, str]:
    """{asset: name} for an asset, {op: name} for a plain op."""
    op = context.op_execution_context if isinstance(context, dg.AssetExecutionContext) else context
    if op.has_assets_def and len(op.assets_def.keys) == 1:
        return {"asset": op.asset_key.to_user_string()}
    return {"op": op.op_def.name}


def publish(
    context: dg.OpExecutionContext | dg.AssetExecutionContext, job: str, registry: CollectorRegistry, **group: str
) -> bool:
    """Push the registry to the Pushgateway (if configured), in the context's group narrowed by `group` (bounded
    labels only, e.g. table=trades); whether it was pushed."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}")
    return push(registry, job, {**grouping_key(context), **group}, logger=context.log)

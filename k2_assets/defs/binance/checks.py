"""Binance checks: the rule catalogue on each stored day, and each live asset's gap check, which every sensor tick
that writes asks for."""

import time
from datetime import date

import dagster as dg

from k2_assets.core import integrity
from k2_assets.core.binance_format import SPOT, UM, Market
from k2_assets.core.outage import StoreHealth
from k2_assets.defs.binance.assets import named
from k2_assets.defs.partitions import binance_days
from k2_assets.defs.resources import IcebergResource
from k2_assets.defs.rule_checks import OUTAGE_WAIT_SECONDS, rule_checks

GAPS = integrity.NO_UNEXPLAINED_GAPS.name


def history_rules(market: Market) -> list[dg.AssetChecksDefinition]:
    return rule_checks(named(market, "trades_history"), "trades", market.exchange, binance_days, files=True)


def live_rules(market: Market) -> list[dg.AssetChecksDefinition]:
    # The live asset's gap check is a definition of its own (below), so that the sensor can ask for it alone after every tick.
    return rule_checks(named(market, "trades"), "trades", market.exchange, binance_days, without=(GAPS,))


def gap_check(market: Market) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=named(market, "trades"),
        name=GAPS,
        partitions_def=binance_days,
        blocking=False,
        description=integrity.NO_UNEXPLAINED_GAPS.description,
    )
    def _gaps(context: dg.AssetCheckExecutionContext, iceberg: IcebergResource) -> dg.AssetCheckResult:
        """The day's open gaps in market.sequence_gaps that nothing explains (the writer and repair keep them current)."""
        day = date.fromisoformat(context.partition_key)

        def read():
            gaps = iceberg.table("sequence_gaps")
            return gaps.scan(row_filter=integrity.gaps_of_day(market.exchange, day)).to_arrow(), gaps.metadata.current_snapshot_id

        # A catalog outage delays the check instead of failing its run.
        rows, snapshot = StoreHealth(logger=context.log).call(
            read, "reading market.sequence_gaps", deadline=time.monotonic() + OUTAGE_WAIT_SECONDS
        )
        outcome = integrity.gap_outcome(rows)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "failed_rows": outcome.failed,
                "gap_rows": rows.num_rows,
                "sample": dg.MetadataValue.json(outcome.sample),
                "snapshot_id": str(snapshot),
            },
        )

    return _gaps


def gap_check_job(market: Market, check: dg.AssetChecksDefinition):
    return dg.define_asset_job(
        named(market, "gap_check_job"),
        selection=dg.AssetSelection.checks(check),
        partitions_def=binance_days,
        description=f"Evaluates {GAPS} on one day of {named(market, 'trades')} (the live sensor asks for it after every "
        "tick that writes).",
    )


binance_trades_history_rules = history_rules(SPOT)
binance_um_trades_history_rules = history_rules(UM)
binance_trades_rules = live_rules(SPOT)
binance_um_trades_rules = live_rules(UM)
binance_trades_no_unexplained_gaps = gap_check(SPOT)
binance_um_trades_no_unexplained_gaps = gap_check(UM)
binance_gap_check_job = gap_check_job(SPOT, binance_trades_no_unexplained_gaps)
binance_um_gap_check_job = gap_check_job(UM, binance_um_trades_no_unexplained_gaps)

binance_checks_job = dg.define_asset_job(
    "binance_checks_job",
    selection=dg.AssetSelection.checks(
        *binance_trades_history_rules,
        *binance_trades_rules,
        binance_trades_no_unexplained_gaps,
        *binance_um_trades_history_rules,
        *binance_um_trades_rules,
        binance_um_trades_no_unexplained_gaps,
    ),
    partitions_def=binance_days,
    description="Runs Binance rule checks alone on a stored day: pick checks by op selection and the day by the "
    "dagster/partition tag in the launchpad.",
)

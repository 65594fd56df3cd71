"""Freshness checks on the live trades and the 1-minute bars, evaluated by Dagster's freshness sensor.

The same limits are Prometheus alerts (K2TradesStale, K2BarsStale in config/prometheus/rules/k2.yml), so an
on-call engineer hears of a stale asset without watching the UI.
"""

import warnings
from datetime import timedelta

import dagster as dg

# Dagster 1.13 prefers FreshnessPolicy on the asset, but that is a status, not an asset check: the checks are what
# the compliance report and the check history record, so K2 keeps them.
warnings.filterwarnings("ignore", message="Function `build_.*freshness_checks` is superseded", category=dg.SupersessionWarning)

TRADES_MAX_AGE = timedelta(minutes=5)  # the sensor reports a materialization per micro-batch, every few seconds
BARS_MAX_AGE = timedelta(minutes=10)  # the rollups follow their trades within a few automation ticks (30 s apart)

freshness_checks = [
    *dg.build_last_update_freshness_checks(assets=["binance_trades", "binance_um_trades"], lower_bound_delta=TRADES_MAX_AGE),
    *dg.build_last_update_freshness_checks(assets=["ohlcv_1m"], lower_bound_delta=BARS_MAX_AGE),
]

freshness_sensor = dg.build_sensor_for_freshness_checks(
    freshness_checks=freshness_checks,
    name="freshness_checks_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)

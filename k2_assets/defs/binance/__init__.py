"""Binance crypto trades: public history dumps (and, later, the live stream)."""

import dagster as dg

from k2_assets.defs.binance.assets import binance_trades, binance_trades_history, kafka_topic
from k2_assets.defs.binance.checks import binance_gap_check_job, binance_trades_no_unexplained_gaps
from k2_assets.defs.binance.resources import BinanceHistoryResource, BinanceRestResource, KafkaResource
from k2_assets.defs.binance.schedules import binance_history_job, binance_history_schedule
from k2_assets.defs.binance.sensors import binance_gap_repair_sensor, binance_trades_repair_job, binance_trades_sensor

assets = [binance_trades_history, kafka_topic, binance_trades]
asset_checks = [binance_trades_no_unexplained_gaps]
jobs = [binance_history_job, binance_trades_repair_job, binance_gap_check_job]
schedules = [binance_history_schedule]
sensors = [binance_trades_sensor, binance_gap_repair_sensor]
resources = {
    "binance_history": BinanceHistoryResource(history_dir=dg.EnvVar("K2_BINANCE_HISTORY_DIR")),
    "kafka": KafkaResource(
        bootstrap=dg.EnvVar("K2_KAFKA_BOOTSTRAP"),
        session_timeout_ms=dg.EnvVar.int("K2_KAFKA_SESSION_TIMEOUT_MS"),
        drain_seconds=dg.EnvVar.int("K2_SENSOR_DRAIN_SECONDS"),
    ),
    "binance_rest": BinanceRestResource(
        base_url=dg.EnvVar("K2_BINANCE_REST_URL"),
        api_key=dg.EnvVar("K2_BINANCE_API_KEY"),
    ),
}

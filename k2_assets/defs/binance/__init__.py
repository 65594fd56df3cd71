"""Binance crypto trades: public history dumps (and, later, the live stream)."""

import dagster as dg

from k2_assets.defs.binance.assets import binance_trades, binance_trades_history, kafka_topic
from k2_assets.defs.binance.resources import BinanceHistoryResource, KafkaResource
from k2_assets.defs.binance.schedules import binance_history_job, binance_history_schedule
from k2_assets.defs.binance.sensors import binance_trades_sensor

assets = [binance_trades_history, kafka_topic, binance_trades]
jobs = [binance_history_job]
schedules = [binance_history_schedule]
sensors = [binance_trades_sensor]
resources = {
    "binance_history": BinanceHistoryResource(history_dir=dg.EnvVar("K2_BINANCE_HISTORY_DIR")),
    "kafka": KafkaResource(bootstrap=dg.EnvVar("K2_KAFKA_BOOTSTRAP")),
}

"""Binance crypto trades: public history dumps (and, later, the live stream)."""

import dagster as dg

from k2_assets.defs.binance.assets import binance_trades_history
from k2_assets.defs.binance.resources import BinanceHistoryResource
from k2_assets.defs.binance.schedules import binance_history_job, binance_history_schedule

assets = [binance_trades_history]
jobs = [binance_history_job]
schedules = [binance_history_schedule]
resources = {"binance_history": BinanceHistoryResource(history_dir=dg.EnvVar("K2_BINANCE_HISTORY_DIR"))}

"""ASX equities history from the vendor's CSV files."""

from k2_assets.defs.asx.assets import asx_quotes, asx_trades
from k2_assets.defs.asx.resources import AsxFilesResource
from k2_assets.defs.asx.schedules import asx_daily_schedule, asx_history_job

import dagster as dg

assets = [asx_trades, asx_quotes]
jobs = [asx_history_job]
schedules = [asx_daily_schedule]
resources = {"asx_files": AsxFilesResource(data_dir=dg.EnvVar("K2_ASX_DATA_DIR"))}

"""Partitions: one per exchange session date."""

import dagster as dg

from k2_assets.core import asx, binance_history

# ASX sessions are weekdays; the key is the Sydney session date (which starts the day before in UTC:
# the loaders and checks apply the Sydney time zone to the key). The windows are labelled in UTC so
# that every trades partition maps to the bars partition of the same key (Dagster maps time windows
# only within one time zone). end_offset=1 makes today's session a partition as soon as the day starts.
asx_sessions = dg.TimeWindowPartitionsDefinition(
    cron_schedule="0 0 * * 1-5",
    start=asx.FIRST_SESSION.isoformat(),
    fmt="%Y-%m-%d",
    timezone="UTC",
    end_offset=1,
)

# Binance trades around the clock; the key is the UTC date. end_offset=1: today's partition exists,
# so live micro-batches can be reported against it as they land.
binance_days = dg.DailyPartitionsDefinition(start_date=binance_history.FIRST_DAY.isoformat(), timezone="UTC", end_offset=1)

# Bars: one partition per trade_date key, whatever the exchange (an ASX session date or a Binance UTC date).
trade_days = dg.DailyPartitionsDefinition(start_date="2014-01-01", timezone="UTC", end_offset=1)

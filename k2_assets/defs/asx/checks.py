"""The rule catalogue on each stored ASX session, as one asset check per rule."""

import dagster as dg

from k2_assets.core import asx
from k2_assets.defs.partitions import asx_sessions
from k2_assets.defs.rule_checks import rule_checks

asx_trades_rules = rule_checks("asx_trades", "trades", asx.EXCHANGE, asx_sessions, files=True)
asx_quotes_rules = rule_checks("asx_quotes", "quotes", asx.EXCHANGE, asx_sessions, files=True)

asx_checks_job = dg.define_asset_job(
    "asx_checks_job",
    selection=dg.AssetSelection.checks(*asx_trades_rules, *asx_quotes_rules),
    partitions_def=asx_sessions,
    description="Runs ASX rule checks alone on a stored session: pick checks by op selection and the session by the "
    "dagster/partition tag in the launchpad.",
)

"""The Dagster code location: every asset, check, job, schedule and resource of K2."""

import dagster as dg

from k2_assets.core.settings import apply_defaults

apply_defaults()  # before any EnvVar below is read: embedded defaults for one machine

from dagster_duckdb import DuckDBResource  # noqa: E402

from k2_assets.core.rollups import DUCKDB_CONFIG  # noqa: E402
from k2_assets.defs import asx, binance, maintenance, rollups  # noqa: E402
from k2_assets.defs.io_manager import IcebergIOManager  # noqa: E402
from k2_assets.defs.resources import IcebergResource  # noqa: E402

defs = dg.Definitions(
    assets=[*asx.assets, *binance.assets, *rollups.assets],
    asset_checks=binance.asset_checks,
    jobs=[*asx.jobs, *binance.jobs, *maintenance.jobs],
    schedules=[*asx.schedules, *binance.schedules, *maintenance.schedules],
    sensors=[*binance.sensors, *rollups.sensors],
    resources={
        "iceberg": IcebergResource(catalog_uri=dg.EnvVar("K2_CATALOG_URI"), warehouse=dg.EnvVar("K2_WAREHOUSE")),
        # The rollups compute in DuckDB through Dagster's resource, with the one hardened configuration.
        "duckdb": DuckDBResource(database=":memory:", connection_config=DUCKDB_CONFIG),
        # Loads any asset partition as a DataFrame: k2_assets.definitions.defs.load_asset_value("ohlcv_1m", partition_key=...)
        "io_manager": IcebergIOManager(catalog_uri=dg.EnvVar("K2_CATALOG_URI"), warehouse=dg.EnvVar("K2_WAREHOUSE")),
        **asx.resources,
        **binance.resources,
    },
    # One process per run: a step in its own process costs seconds of start-up and buys nothing here.
    executor=dg.in_process_executor,
)

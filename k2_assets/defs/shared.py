"""Resources every source shares: the Iceberg catalog, DuckDB, and the I/O manager for notebook loads."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from k2_assets.core.rollups import DUCKDB_CONFIG
from k2_assets.defs.io_manager import IcebergIOManager
from k2_assets.defs.resources import IcebergResource

defs = dg.Definitions(
    resources={
        "iceberg": IcebergResource(catalog_uri=dg.EnvVar("K2_CATALOG_URI"), warehouse=dg.EnvVar("K2_WAREHOUSE")),
        # DuckDB through Dagster's resource, with the one hardened configuration.
        "duckdb": DuckDBResource(database=":memory:", connection_config=DUCKDB_CONFIG),
        # Loads any asset partition as a DataFrame: k2_assets.definitions.defs.load_asset_value("ohlcv_1m", partition_key=...)
        "io_manager": IcebergIOManager(catalog_uri=dg.EnvVar("K2_CATALOG_URI"), warehouse=dg.EnvVar("K2_WAREHOUSE")),
    },
    # One process per run: a step in its own process costs seconds of start-up and buys nothing here.
    executor=dg.in_process_executor,
)

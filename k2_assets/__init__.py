"""K2: a market-data lakehouse of Dagster software-defined assets.

The code location is `k2_assets.definitions` (its `defs`); `k2_assets.core` is plain Python and importing
it loads no Dagster and changes no environment variable.
"""

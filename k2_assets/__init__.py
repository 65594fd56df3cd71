"""K2: a market-data lakehouse of Dagster software-defined assets."""

from k2_assets.definitions import defs

__all__ = ["defs"]

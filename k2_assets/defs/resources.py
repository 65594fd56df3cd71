"""Resources shared by every source."""

from __future__ import annotations

from functools import cache

import dagster as dg
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from k2_assets.core import catalog


@cache
def _catalog(uri: str, warehouse: str) -> Catalog:
    return catalog.open_catalog(uri, warehouse)


class IcebergResource(dg.ConfigurableResource):
    """The Iceberg SQL catalog (SQLite or Postgres) and its warehouse (file:// or s3://)."""

    catalog_uri: str
    warehouse: str

    def catalog(self) -> Catalog:
        return _catalog(self.catalog_uri, self.warehouse)

    def table(self, name: str) -> Table:
        """`market.<name>`, created on first use."""
        return catalog.ensure_table(self.catalog(), name)

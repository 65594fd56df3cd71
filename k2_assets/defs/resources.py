"""Resources shared by every source."""

from __future__ import annotations

import os
from functools import cache

import dagster as dg
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from k2_assets.core import catalog


@cache
def _catalog(uri: str, warehouse: str, database: tuple[int, int] | None) -> Catalog:
    return catalog.open_catalog(uri, warehouse)


def _database_file(uri: str) -> tuple[int, int] | None:
    """A SQLite catalog file's identity: a catalog restored or rebuilt under the same name is a new file, and a
    connection kept open to the old one would write where no one reads."""
    if not uri.startswith("sqlite:///"):
        return None
    try:
        stat = os.stat(uri.removeprefix("sqlite:///"))
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


class IcebergResource(dg.ConfigurableResource):
    """The Iceberg SQL catalog (SQLite or Postgres) and its warehouse (file:// or s3://)."""

    catalog_uri: str
    warehouse: str

    def catalog(self) -> Catalog:
        return _catalog(self.catalog_uri, self.warehouse, _database_file(self.catalog_uri))

    def table(self, name: str) -> Table:
        """`market.<name>`, created on first use."""
        return catalog.ensure_table(self.catalog(), name)

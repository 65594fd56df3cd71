"""Read K2's assets back as DataFrames: an I/O manager over the Iceberg tables the assets write.

K2's assets write to Iceberg themselves and return `MaterializeResult`, so this I/O manager never
stores anything. It exists for the reading side: `defs.load_asset_value("asx_trades",
partition_key="2014-03-10")` in a notebook, or an asset input in a downstream asset, gets the rows
of that asset's partition, and only the columns asked for, straight from the table.

Input metadata (`metadata=` of `load_asset_value`, or `AssetIn(metadata=...)`) tunes one load:

- `columns`: list of column names to read (default: the I/O manager's `columns`, else all);
- `as_of`: an Iceberg snapshot id to read instead of the current one (time travel; the
  `snapshot_id` an asset reports in its materialization metadata is one), or a time (datetime or
  ISO 8601, UTC unless an offset is given): the snapshot that was current then;
- `dataframe`: "pandas", "arrow" or "polars" for this load only.

`python_type=pa.Table`, `pd.DataFrame` or `polars.DataFrame` picks the flavour too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
from pydantic import field_validator
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, In, IsNull
from pyiceberg.table import Table

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import schemas, snapshots
from k2_assets.core.asx import EXCHANGE as ASX
from k2_assets.core.binance_format import SPOT, UM

DATAFRAME_KINDS = ("pandas", "arrow", "polars")


@dataclass(frozen=True)
class AssetTable:
    """Where an asset's rows live: a K2 table, restricted to one exchange and, for history, to file-sourced rows."""

    table: str
    exchange: str | None = None
    batch_only: bool = False

    def row_filter(self, trade_dates: list[str] | None) -> BooleanExpression:
        parts: list[BooleanExpression] = []
        if self.exchange is not None:
            parts.append(EqualTo("exchange", self.exchange))
        if trade_dates is not None:
            parts.append(EqualTo("trade_date", trade_dates[0]) if len(trade_dates) == 1 else In("trade_date", set(trade_dates)))
        if self.batch_only:
            parts.append(IsNull("kafka_topic"))
        if not parts:
            return AlwaysTrue()
        return parts[0] if len(parts) == 1 else And(*parts)


# The explicit allowlist: an asset not here cannot be loaded (its rows would be a guess).
ASSET_TABLES: dict[str, AssetTable] = {
    "asx_trades": AssetTable("trades", ASX),
    "asx_quotes": AssetTable("quotes", ASX),
    # History owns the day's file-sourced rows of market.trades (kafka_topic IS NULL) ...
    "binance_trades_history": AssetTable("trades", SPOT.exchange, batch_only=True),
    "binance_um_trades_history": AssetTable("trades", UM.exchange, batch_only=True),
    # ... while binance_trades (live micro-batches plus repairs) is every BINANCE row of the day,
    # history rows included: that is what its checks and its dagster/row_count describe.
    "binance_trades": AssetTable("trades", SPOT.exchange),
    "binance_um_trades": AssetTable("trades", UM.exchange),
    # The exchange's own bars: every Binance market of the day.
    "binance_klines": AssetTable("exchange_bars"),
    # Rollups: one table per interval, every exchange of the trade_date.
    **{f"ohlcv_{i}": AssetTable(f"ohlcv_{i}") for i in schemas.INTERVALS},
}


@cache
def _catalog(uri: str, warehouse: str) -> Catalog:
    return k2_catalog.open_catalog(uri, warehouse)


def _redacted(uri: str) -> str:
    """A catalog URI fit for an error message: no password (postgresql://k2:secret@db/k2 -> postgresql://k2:***@db/k2)."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", uri)


def dataframe_kind(value: Any) -> str:
    if value not in DATAFRAME_KINDS:
        raise ValueError(f"unknown dataframe kind {value!r}: IcebergIOManager returns one of {list(DATAFRAME_KINDS)}")
    return value


def _kind_of_python_type(context: dg.InputContext) -> str | None:
    """The flavour a caller asked for with python_type= (None when it asked for nothing in particular)."""
    try:
        wanted = context.dagster_type.typing_type
    except dg.DagsterInvariantViolationError:
        return None
    if wanted is pa.Table:
        return "arrow"
    if wanted is pd.DataFrame:
        return "pandas"
    if isinstance(wanted, type) and wanted.__name__ == "DataFrame" and wanted.__module__.split(".")[0] == "polars":
        return "polars"
    return None


def _in_a_run(context: dg.InputContext) -> bool:
    try:
        context.step_context  # noqa: B018 (the property raises outside a run)
    except dg.DagsterInvariantViolationError:
        return False
    return True


def trade_dates(context: dg.InputContext) -> list[str] | None:
    """The trade_date values of the partitions being loaded; None for an unpartitioned load (every date)."""
    if not context.has_asset_partitions:
        return None
    asset = context.asset_key.to_user_string()
    keys = list(context.asset_partition_keys)
    if not keys:
        raise ValueError(f"{asset}: the requested partition range holds no partition of the asset")
    # load_asset_value(partition_key=...) outside a run: Dagster maps a key that is not a partition
    # (a Saturday of the ASX weekday sessions) to the next partition. Refuse instead of reading another day.
    if not _in_a_run(context) and context.has_partition_key and context.partition_key not in keys:
        raise ValueError(f"{asset}: {context.partition_key!r} is not a partition of the asset (the nearest is {keys[0]!r})")
    for key in keys:
        try:
            date.fromisoformat(key)
        except (TypeError, ValueError):
            raise ValueError(f"{asset}: partition key {key!r} is not a trade date (YYYY-MM-DD)") from None
    return keys


def to_dataframe(rows: pa.Table, kind: str):
    """`rows` as the requested flavour; pandas keeps Arrow types, so decimals stay exact."""
    if kind == "arrow":
        return rows
    if kind == "pandas":
        return rows.to_pandas(types_mapper=pd.ArrowDtype)
    if kind == "polars":
        try:
            import polars as pl
        except ImportError as e:  # an optional dependency
            raise ImportError("dataframe='polars' needs the polars package: pip install polars") from e
        return pl.from_arrow(rows)
    raise ValueError(f"unknown dataframe kind {kind!r}: IcebergIOManager returns one of {list(DATAFRAME_KINDS)}")


class IcebergIOManager(dg.ConfigurableIOManager):
    """Loads K2 assets from their Iceberg tables, one partition (trade_date) and only the columns asked for.

    Stores nothing: K2's assets write to Iceberg themselves and return MaterializeResult. Supported
    assets and what they read:

    - asx_trades: market.trades where exchange = 'ASX'
    - asx_quotes: market.quotes where exchange = 'ASX'
    - binance_trades_history: market.trades where exchange = 'BINANCE' and kafka_topic IS NULL
      (the rows that came from the history dumps)
    - binance_trades: market.trades where exchange = 'BINANCE', every row of the day (live rows
      from Kafka, repairs and history rows alike)
    - binance_um_trades_history, binance_um_trades: the same for USD-M futures (exchange = 'BINANCE_UM')
    - binance_klines: market.exchange_bars, every Binance market
    - ohlcv_1m, ohlcv_5m, ohlcv_1h, ohlcv_1d: market.ohlcv_<interval>, every exchange

    A partition key is a trade date: the load reads trade_date = key (a range of keys: trade_date
    IN the keys); without a partition key it reads every date. A partition never materialized
    loads as an empty frame with the table's columns.
    """

    catalog_uri: str
    warehouse: str
    dataframe: str = "pandas"  # "pandas" | "arrow" | "polars"
    columns: list[str] | None = None  # default columns of every load; input metadata "columns" overrides

    @field_validator("dataframe")
    @classmethod
    def _known_dataframe_kind(cls, value: str) -> str:
        return dataframe_kind(value)  # fail when the resource is built, not at the first load

    def catalog(self) -> Catalog:
        return _catalog(self.catalog_uri, self.warehouse)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return  # the asset wrote its rows to Iceberg itself
        name = context.asset_key.to_user_string() if context.has_asset_key else context.name
        raise TypeError(
            f"{name} returned a {type(obj).__name__}, which IcebergIOManager cannot store: K2 assets write their "
            "rows to Iceberg themselves (k2_assets.core.writer) and return MaterializeResult without a value"
        )

    def load_input(self, context: dg.InputContext):
        if not context.has_asset_key:
            raise ValueError("IcebergIOManager loads assets only, not op outputs")
        name = context.asset_key.to_user_string()
        if name not in ASSET_TABLES:
            raise KeyError(f"IcebergIOManager cannot load asset {name!r}; it loads {sorted(ASSET_TABLES)}")
        source = ASSET_TABLES[name]
        metadata = context.definition_metadata or {}
        kind = dataframe_kind(metadata.get("dataframe") or _kind_of_python_type(context) or self.dataframe)

        table = self._table(name, source.table)
        columns = self._columns(table, name, metadata.get("columns", self.columns))
        snapshot_id = self._snapshot(table, metadata.get("as_of"))
        row_filter = source.row_filter(trade_dates(context))
        fields = tuple(columns) if columns else ("*",)
        rows = table.scan(row_filter=row_filter, selected_fields=fields, snapshot_id=snapshot_id).to_arrow()
        if columns:
            rows = rows.select(columns)  # the order asked for, not the schema's
        return to_dataframe(rows, kind)

    def _table(self, asset: str, name: str) -> Table:
        identifier = k2_catalog.table_identifier(name)
        try:
            return self.catalog().load_table(identifier)
        except NoSuchTableError:
            raise LookupError(
                f"{identifier} does not exist in catalog {_redacted(self.catalog_uri)} yet: materialize {asset} first"
            ) from None

    @staticmethod
    def _columns(table: Table, asset: str, columns) -> list[str] | None:
        if columns is None:
            return None
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns) or not columns:
            raise ValueError(f"{asset}: columns must be a non-empty list of column names, not {columns!r}")
        known = [f.name for f in table.schema().fields]
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"{asset}: no column {unknown} in {'.'.join(table.name())}; its columns are {known}")
        return list(dict.fromkeys(columns))

    @staticmethod
    def _snapshot(table: Table, as_of) -> int | None:
        if as_of is None:
            return None
        try:
            wanted = snapshots.parse_as_of(as_of)
        except ValueError:
            raise ValueError(f"as_of must be an Iceberg snapshot id or a time (ISO 8601), not {as_of!r}") from None
        identifier = ".".join(table.name())
        if isinstance(wanted, datetime):
            snapshot = snapshots.snapshot_at(table, wanted)
            if snapshot is None:
                raise LookupError(f"{identifier} has no snapshot as of {wanted.isoformat()} (its history starts later)")
            return snapshot.snapshot_id
        if table.snapshot_by_id(wanted) is None:
            raise LookupError(f"snapshot {wanted} is not in the history of {identifier} (expired, or of another table)")
        return wanted


__all__ = ["ASSET_TABLES", "DATAFRAME_KINDS", "AssetTable", "IcebergIOManager", "to_dataframe"]

"""IcebergIOManager: assets read back from a real SQLite-catalog Iceberg warehouse, and the analyst notebook run end to end."""

import collections
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pytest
from pyiceberg.expressions import And, EqualTo

from k2_assets.core import binance_history, schemas
from k2_assets.core import catalog as k2_catalog
from k2_assets.defs.asx.assets import asx_quotes, asx_trades
from k2_assets.defs.binance.assets import binance_trades, binance_trades_history, kafka_topic
from k2_assets.defs.binance.resources import BinanceRestResource, KafkaResource
from k2_assets.defs.io_manager import ASSET_TABLES, IcebergIOManager
from k2_assets.defs.partitions import asx_sessions
from k2_assets.defs.rollups.assets import ohlcv_1d, ohlcv_1h, ohlcv_1m, ohlcv_5m
from k2_assets_tests.conftest import make_resources
from k2_assets_tests.test_asx_decode import expected_counts

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebooks" / "explore.ipynb"
MONDAY, TUESDAY = "2014-03-10", "2014-03-11"
BINANCE_DAY = "2024-01-01"
LIVE_ROWS = 1000
# Never contacted: the binance assets are only loaded here, never run.
OFFLINE = {"kafka": KafkaResource(bootstrap="127.0.0.1:9"), "binance_rest": BinanceRestResource(base_url="http://127.0.0.1:9")}


def location(props: dict, **io_manager_config) -> dg.Definitions:
    """The code location's assets with IcebergIOManager as io_manager, over the catalog `props`."""
    return dg.Definitions(
        assets=[
            asx_trades,
            asx_quotes,
            binance_trades_history,
            binance_trades,
            kafka_topic,
            ohlcv_1m,
            ohlcv_5m,
            ohlcv_1h,
            ohlcv_1d,
        ],
        resources={**make_resources(props), **OFFLINE, "io_manager": IcebergIOManager(**props, **io_manager_config)},
    )


def props_under(root: Path) -> dict[str, str]:
    return {"catalog_uri": f"sqlite:///{root}/catalog.db", "warehouse": f"file://{root}/warehouse"}


def bars(rows: list[tuple]) -> pa.Table:
    """OHLCV bars: (exchange, symbol, bar_start, open, high, low, close, volume, trade_count)."""
    n = len(rows)
    cols = list(zip(*rows))

    def price(values):
        return pa.array([Decimal(v) for v in values])

    starts = list(cols[2])
    volume = [Decimal(v) for v in cols[7]]
    quote = [Decimal(c) * v for c, v in zip(cols[6], volume)]
    return schemas.build_table(
        schemas.OHLCV,
        {
            "exchange": pa.array(cols[0]),
            "symbol": pa.array(cols[1]),
            "interval": pa.array(["1m"] * n),
            "bar_start": pa.array(starts, pa.timestamp("us", tz="UTC")),
            # ASX sessions are Sydney dates: a bar at 23:00 UTC belongs to the next day's session.
            "trade_date": pa.array(
                [(s + timedelta(hours=11)).date() if e == "ASX" else s.date() for e, s in zip(cols[0], starts)]
            ),
            "open": price(cols[3]),
            "high": price(cols[4]),
            "low": price(cols[5]),
            "close": price(cols[6]),
            "volume": pa.array(volume),
            "quote_volume": pa.array(quote),
            "vwap": price(cols[6]),
            "trade_count": pa.array(cols[8], pa.int64()),
            "taker_buy_volume": pa.array([Decimal(0)] * n),
            "taker_buy_quote_volume": pa.array([Decimal(0)] * n),
            "filled": pa.array([False] * n),
            "source_snapshot_id": pa.array([1] * n, pa.int64()),
            "computed_at": pa.array([datetime(2024, 6, 1, tzinfo=UTC)] * n, pa.timestamp("us", tz="UTC")),
        },
        n,
    )


UTC = UTC
BARS = bars(
    [
        ("ASX", "BHP", datetime(2014, 3, 9, 23, 0, tzinfo=UTC), "36.667", "36.70", "36.60", "36.65", "20000", 12),
        ("ASX", "BHP", datetime(2014, 3, 9, 23, 1, tzinfo=UTC), "36.65", "36.65", "36.61", "36.62", "1500.5", 3),
        ("ASX", "RIO", datetime(2014, 3, 9, 23, 0, tzinfo=UTC), "62.00", "62.01", "61.99", "62.00", "700", 5),
        (
            "BINANCE",
            "BTCUSDT",
            datetime(2014, 3, 10, 12, tzinfo=UTC),
            "635.12345678",
            "636",
            "635",
            "635.50000001",
            "1.23456789",
            4,
        ),
        ("ASX", "BHP", datetime(2014, 3, 10, 23, 0, tzinfo=UTC), "36.90", "36.90", "36.90", "36.90", "10", 1),
    ]
)
BARS_ON_MONDAY = 4  # three ASX bars of the Monday session and one BINANCE bar of that UTC day


@dataclass(frozen=True)
class Lake:
    props: dict
    catalog: object
    monday_snapshot: int  # market.trades right after asx_trades 2014-03-10, before 2014-03-11 was written


@pytest.fixture(scope="module")
def lake(tmp_path_factory, asx_dir, btcusdt_dir) -> Lake:
    """ASX Monday and Tuesday, a Binance day (1000 rows live from Kafka, the rest from the dump) and some bars."""
    props = props_under(tmp_path_factory.mktemp("lake"))
    resources = make_resources(props, asx_dir=asx_dir, binance_dir=btcusdt_dir)
    monday = dg.materialize([asx_trades, asx_quotes], partition_key=MONDAY, resources=resources)
    assert monday.success
    (event,) = monday.asset_materializations_for_node("asx_trades")
    monday_snapshot = int(event.metadata["snapshot_id"].value)
    assert dg.materialize([asx_trades], partition_key=TUESDAY, resources=resources).success

    catalog = k2_catalog.open_catalog(props["catalog_uri"], props["warehouse"])
    batch, _ = binance_history.load_day(btcusdt_dir, date(2024, 1, 1), source="test")
    live = batch.rows.slice(0, LIVE_ROWS)
    topic = pa.array(["market.crypto.trades.binance"] * LIVE_ROWS)
    live = live.set_column(live.schema.get_field_index("kafka_topic"), "kafka_topic", topic)
    live = live.set_column(live.schema.get_field_index("kafka_offset"), "kafka_offset", pa.array(range(LIVE_ROWS), pa.int64()))
    live = live.set_column(live.schema.get_field_index("source_file"), "source_file", pa.nulls(LIVE_ROWS, pa.string()))
    k2_catalog.ensure_table(catalog, "trades").append(live)
    assert dg.materialize([binance_trades_history], partition_key=BINANCE_DAY, resources=resources).success

    k2_catalog.ensure_table(catalog, "ohlcv_1m").append(BARS)
    return Lake(props, catalog, monday_snapshot)


def table_rows(catalog, table: str, exchange: str, day: str) -> pa.Table:
    """The table's rows of one exchange session, read straight from Iceberg (the expectation)."""
    return (
        catalog.load_table(f"market.{table}")
        .scan(row_filter=And(EqualTo("exchange", exchange), EqualTo("trade_date", day)))
        .to_arrow()
    )


def per_symbol(symbols) -> collections.Counter:
    return collections.Counter(symbols)


# --- pandas by default: exactly one session, exact decimals ------------------------------------------------------


def test_a_partition_loads_exactly_the_sessions_rows_as_pandas(lake, asx_dir):
    defs = location(lake.props)
    df = defs.load_asset_value("asx_trades", partition_key=MONDAY)
    expected = table_rows(lake.catalog, "trades", "ASX", MONDAY)

    assert isinstance(df, pd.DataFrame)
    assert len(df) == expected.num_rows > 40_000
    assert sorted(df["message_id"]) == sorted(expected.column("message_id").to_pylist())
    assert df["message_id"].is_unique
    assert set(df["exchange"]) == {"ASX"} and set(df["trade_date"]) == {date(2014, 3, 10)}
    assert list(df.columns) == [f.name for f in lake.catalog.load_table("market.trades").schema().fields]
    # Independently of Iceberg: the vendor files' rows of that session, per symbol.
    vendor = {s: n for (s, d), n in expected_counts(asx_dir, "trades").items() if d == date(2014, 3, 10)}
    assert per_symbol(df["symbol"]) == vendor

    # Decimals are exact, not floats.
    assert df["price"].dtype == pd.ArrowDtype(pa.decimal128(18, 8))
    first = expected.sort_by("message_id").slice(0, 1).to_pylist()[0]
    row = df.set_index("message_id").loc[first["message_id"]]
    assert row["price"] == first["price"] and isinstance(row["price"], Decimal)
    assert row["quantity"] == first["quantity"]

    # Another session is another set of rows; quotes come from market.quotes.
    tuesday = defs.load_asset_value("asx_trades", partition_key=TUESDAY)
    assert len(tuesday) == table_rows(lake.catalog, "trades", "ASX", TUESDAY).num_rows
    assert set(tuesday["message_id"]).isdisjoint(df["message_id"])
    quotes = defs.load_asset_value("asx_quotes", partition_key=MONDAY)
    assert len(quotes) == table_rows(lake.catalog, "quotes", "ASX", MONDAY).num_rows > 0
    assert list(quotes.columns) == [f.name for f in lake.catalog.load_table("market.quotes").schema().fields]
    assert quotes["bid_price"].dtype == pd.ArrowDtype(pa.decimal128(18, 8))


def test_a_partition_range_reads_every_session_in_it(lake):
    with location(lake.props).get_asset_value_loader() as loader:
        both = loader.load_asset_value(
            "asx_trades",
            partition_key_range=dg.PartitionKeyRange(MONDAY, TUESDAY),
            input_definition_metadata={"columns": ["trade_date", "message_id"]},
        )
    assert collections.Counter(both["trade_date"]) == {
        date(2014, 3, 10): table_rows(lake.catalog, "trades", "ASX", MONDAY).num_rows,
        date(2014, 3, 11): table_rows(lake.catalog, "trades", "ASX", TUESDAY).num_rows,
    }


# --- columns, flavours, time travel ------------------------------------------------------------------------------


def test_columns_from_input_metadata_or_the_io_manager(lake):
    n = table_rows(lake.catalog, "trades", "ASX", MONDAY).num_rows
    df = location(lake.props).load_asset_value(
        "asx_trades", partition_key=MONDAY, metadata={"columns": ["symbol", "price", "exchange_timestamp"]}
    )
    assert list(df.columns) == ["symbol", "price", "exchange_timestamp"] and len(df) == n

    narrow = location(lake.props, columns=["message_id"])
    assert list(narrow.load_asset_value("asx_trades", partition_key=MONDAY).columns) == ["message_id"]
    # Input metadata wins over the I/O manager's default.
    symbols = narrow.load_asset_value("asx_trades", partition_key=MONDAY, metadata={"columns": ["symbol"]})
    assert list(symbols.columns) == ["symbol"]

    with pytest.raises(ValueError, match=r"no column \['bid'\] in market.trades"):
        location(lake.props).load_asset_value("asx_trades", partition_key=MONDAY, metadata={"columns": ["symbol", "bid"]})
    with pytest.raises(ValueError, match="non-empty list of column names"):
        location(lake.props).load_asset_value("asx_trades", partition_key=MONDAY, metadata={"columns": "symbol"})


def test_arrow_and_polars_on_request(lake):
    import polars as pl

    expected = table_rows(lake.catalog, "trades", "ASX", MONDAY)
    arrow = location(lake.props, dataframe="arrow").load_asset_value("asx_trades", partition_key=MONDAY)
    assert isinstance(arrow, pa.Table) and arrow.num_rows == expected.num_rows
    assert arrow.schema.field("price").type == pa.decimal128(18, 8)
    assert sorted(arrow.column("message_id").to_pylist()) == sorted(expected.column("message_id").to_pylist())

    defs = location(lake.props)
    polars = defs.load_asset_value(
        "asx_trades", partition_key=MONDAY, metadata={"dataframe": "polars", "columns": ["symbol", "price"]}
    )
    assert isinstance(polars, pl.DataFrame) and polars.columns == ["symbol", "price"]
    assert polars.height == expected.num_rows and polars.schema["price"] == pl.Decimal(18, 8)
    assert dict(polars.group_by("symbol").len().iter_rows()) == dict(per_symbol(expected.column("symbol").to_pylist()))
    # python_type= picks the flavour too.
    assert isinstance(defs.load_asset_value("asx_trades", partition_key=MONDAY, python_type=pa.Table), pa.Table)
    assert isinstance(defs.load_asset_value("asx_trades", partition_key=MONDAY, python_type=pl.DataFrame), pl.DataFrame)


def test_as_of_reads_an_older_snapshot(lake):
    defs = location(lake.props)
    now = defs.load_asset_value("asx_trades", partition_key=TUESDAY, metadata={"columns": ["message_id"]})
    assert len(now) > 0
    # Before Tuesday was written, its partition was empty; Monday was all there.
    for as_of in (lake.monday_snapshot, str(lake.monday_snapshot)):  # the snapshot_id metadata is a string
        then = defs.load_asset_value("asx_trades", partition_key=TUESDAY, metadata={"as_of": as_of, "columns": ["message_id"]})
        assert len(then) == 0 and list(then.columns) == ["message_id"]
    monday_then = defs.load_asset_value("asx_trades", partition_key=MONDAY, metadata={"as_of": lake.monday_snapshot})
    assert len(monday_then) == table_rows(lake.catalog, "trades", "ASX", MONDAY).num_rows
    with pytest.raises(LookupError, match="snapshot 42 is not in the history of market.trades"):
        defs.load_asset_value("asx_trades", partition_key=MONDAY, metadata={"as_of": 42})


# --- the asset -> rows mapping -----------------------------------------------------------------------------------


def test_binance_history_is_the_dump_rows_and_binance_trades_every_row_of_the_day(lake):
    defs = location(lake.props)
    day = table_rows(lake.catalog, "trades", "BINANCE", BINANCE_DAY)
    history = defs.load_asset_value("binance_trades_history", partition_key=BINANCE_DAY, metadata={"dataframe": "arrow"})
    everything = defs.load_asset_value("binance_trades", partition_key=BINANCE_DAY, metadata={"dataframe": "arrow"})
    assert everything.num_rows == day.num_rows == 16702
    assert history.num_rows == day.num_rows - LIVE_ROWS
    assert history.column("kafka_topic").null_count == history.num_rows
    assert set(history.column("message_id").to_pylist()) < set(everything.column("message_id").to_pylist())
    # Neither sees ASX rows, and ASX assets see no BINANCE rows.
    assert set(everything.column("exchange").to_pylist()) == {"BINANCE"}
    assert len(defs.load_asset_value("asx_trades", partition_key=BINANCE_DAY)) == 0


def test_ohlcv_bars_of_every_exchange_for_the_trade_date(lake):
    defs = location(lake.props)
    got = defs.load_asset_value("ohlcv_1m", partition_key=MONDAY)
    assert len(got) == BARS_ON_MONDAY
    assert collections.Counter(zip(got["exchange"], got["symbol"])) == {
        ("ASX", "BHP"): 2,
        ("ASX", "RIO"): 1,
        ("BINANCE", "BTCUSDT"): 1,
    }
    assert set(got["trade_date"]) == {date(2014, 3, 10)}
    btc = got[got["symbol"] == "BTCUSDT"].iloc[0]
    assert btc["close"] == Decimal("635.50000001") and btc["volume"] == Decimal("1.23456789")
    assert btc["quote_volume"] == Decimal("635.50000001") * Decimal("1.23456789")  # 38,16: exact
    assert len(defs.load_asset_value("ohlcv_1m", partition_key=TUESDAY)) == 1


def test_every_asset_of_the_code_location_that_holds_rows_is_supported():
    from k2_assets.definitions import defs as code_location

    keys = {k.to_user_string() for k in code_location.resolve_asset_graph().get_all_asset_keys()}
    tables = keys - {"kafka/market_crypto_trades_binance", "kafka/market_crypto_trades_binance_um"}
    assert tables <= set(ASSET_TABLES)
    assert {a: (t.table, t.exchange, t.batch_only) for a, t in ASSET_TABLES.items()} == {
        "asx_trades": ("trades", "ASX", False),
        "asx_quotes": ("quotes", "ASX", False),
        "binance_trades_history": ("trades", "BINANCE", True),
        "binance_klines": ("exchange_bars", None, False),
        "binance_trades": ("trades", "BINANCE", False),
        "binance_um_trades_history": ("trades", "BINANCE_UM", True),
        "binance_um_trades": ("trades", "BINANCE_UM", False),
        **{f"ohlcv_{i}": (f"ohlcv_{i}", None, False) for i in ("1m", "5m", "1h", "1d")},
    }


# --- clear errors ------------------------------------------------------------------------------------------------


def test_unknown_assets_dataframe_kinds_and_partitions_are_clear_errors(lake, tmp_path):
    defs = location(lake.props)
    unknown = r"cannot load asset 'kafka/market_crypto_trades_binance'; it loads \['asx_quotes', 'asx_trades'"
    with pytest.raises(KeyError, match=unknown):
        defs.load_asset_value(["kafka", "market_crypto_trades_binance"])
    kinds = r"unknown dataframe kind 'excel': IcebergIOManager returns one of \['pandas', 'arrow', 'polars'\]"
    with pytest.raises(ValueError, match=kinds):
        defs.load_asset_value("asx_trades", partition_key=MONDAY, metadata={"dataframe": "excel"})
    with pytest.raises(ValueError, match="unknown dataframe kind 'excel'"):  # when the resource is built
        IcebergIOManager(**lake.props, dataframe="excel")
    # Dagster would quietly map a Saturday to the next ASX session; the I/O manager refuses.
    with pytest.raises(ValueError, match="'2014-03-08' is not a partition of the asset"):
        defs.load_asset_value("asx_trades", partition_key="2014-03-08")
    with pytest.raises(ValueError, match="as_of must be an Iceberg snapshot id"):
        defs.load_asset_value("asx_trades", partition_key=MONDAY, metadata={"as_of": "yesterday"})
    # A table no asset has written yet: say which asset to materialize (and do not create it).
    empty = props_under(tmp_path)
    with pytest.raises(LookupError, match="market.quotes does not exist in catalog .* yet: materialize asx_quotes first"):
        location(empty).load_asset_value("asx_quotes", partition_key=MONDAY)
    assert not k2_catalog.open_catalog(empty["catalog_uri"], empty["warehouse"]).table_exists("market.quotes")


def test_handle_output_accepts_none_and_refuses_a_value(tmp_path):
    manager = IcebergIOManager(**props_under(tmp_path))
    manager.handle_output(dg.build_output_context(asset_key="asx_trades"), None)

    @dg.asset
    def returns_nothing():
        return None

    @dg.asset
    def returns_a_frame():
        return pd.DataFrame({"x": [1]})

    assert dg.materialize([returns_nothing], resources={"io_manager": manager}).success
    result = dg.materialize([returns_a_frame], resources={"io_manager": manager}, raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error.cause.cls_name == "TypeError"
    assert "returns_a_frame returned a DataFrame, which IcebergIOManager cannot store" in error.cause.message


# --- in the style of project_fully_featured: a partitioned I/O manager against tmp_path ------------------------


def test_partitioned_io_manager_against_tmp_path(tmp_path, asx_dir):
    """Upstream and downstream assets of one partition materialized together over a warehouse under tmp_path:
    the downstream gets the upstream partition's rows, read from that partition's files only."""
    props = props_under(tmp_path)
    seen: dict[str, object] = {}

    narrow = dg.AssetIn(metadata={"columns": ["message_id", "symbol", "price"]})

    @dg.asset(partitions_def=asx_sessions, ins={"asx_trades": narrow})
    def symbols_seen(context: dg.AssetExecutionContext, asx_trades: pd.DataFrame) -> None:
        seen[context.partition_key] = asx_trades

    @dg.asset(partitions_def=asx_sessions)
    def arrow_seen(context: dg.AssetExecutionContext, asx_trades: pa.Table) -> None:
        seen["arrow " + context.partition_key] = asx_trades

    resources = {**make_resources(props, asx_dir=asx_dir), "io_manager": IcebergIOManager(**props)}
    for key in (MONDAY, TUESDAY):
        assert dg.materialize([asx_trades, symbols_seen, arrow_seen], partition_key=key, resources=resources).success

    catalog = k2_catalog.open_catalog(props["catalog_uri"], props["warehouse"])
    data = tmp_path / "warehouse" / "market" / "trades" / "data" / "exchange=ASX"
    files = {key: sorted((data / f"trade_date={key}").glob("*.parquet")) for key in (MONDAY, TUESDAY)}
    assert files[MONDAY] and files[TUESDAY]
    for key in (MONDAY, TUESDAY):
        expected = table_rows(catalog, "trades", "ASX", key)
        frame = seen[key]
        assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["message_id", "symbol", "price"]
        assert sorted(frame["message_id"]) == sorted(expected.column("message_id").to_pylist())
        assert isinstance(seen["arrow " + key], pa.Table) and seen["arrow " + key].num_rows == expected.num_rows

    # Only the partition's files are read: with Tuesday's files broken, Monday still loads, Tuesday does not.
    for path in files[TUESDAY]:
        path.write_bytes(b"not parquet")
    defs = dg.Definitions(assets=[asx_trades], resources={**make_resources(props), "io_manager": IcebergIOManager(**props)})
    assert len(defs.load_asset_value("asx_trades", partition_key=MONDAY)) == table_rows(catalog, "trades", "ASX", MONDAY).num_rows
    with pytest.raises(pa.ArrowInvalid):
        defs.load_asset_value("asx_trades", partition_key=TUESDAY)


# --- the code location and the notebook --------------------------------------------------------------------------

REGISTER = (
    'register it in k2_assets/definitions.py: "io_manager": IcebergIOManager(catalog_uri=dg.EnvVar("K2_CATALOG_URI"), '
    'warehouse=dg.EnvVar("K2_WAREHOUSE"))'
)


def test_the_code_location_loads_assets_through_the_iceberg_io_manager():
    from k2_assets.definitions import defs as code_location

    manager = code_location.resources.get("io_manager")
    assert isinstance(manager, IcebergIOManager), REGISTER
    assert manager.dataframe == "pandas"


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "\n".join(parts)


def test_the_notebook_runs_end_to_end_on_a_prepared_k2_home(k2_home, catalog_props, catalog, asx_dir, tmp_path, monkeypatch):
    """The analyst notebook against a K2_HOME this test fills: asx_trades of one session and some one-minute bars."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from k2_assets.definitions import defs as code_location

    assert isinstance(code_location.resources.get("io_manager"), IcebergIOManager), REGISTER
    # The embedded defaults for this K2_HOME are exactly where the data goes.
    assert catalog_props == {"catalog_uri": f"sqlite:///{k2_home}/catalog.db", "warehouse": f"file://{k2_home}/warehouse"}
    assert dg.materialize([asx_trades], partition_key=TUESDAY, resources=make_resources(catalog_props, asx_dir=asx_dir)).success
    k2_catalog.ensure_table(catalog, "ohlcv_1m").append(BARS)
    expected = table_rows(catalog, "trades", "ASX", TUESDAY)
    counts = per_symbol(expected.column("symbol").to_pylist())

    # A kernel of this very interpreter (the venv's), whatever kernels the machine has.
    kernels = tmp_path / "jupyter" / "kernels" / "k2-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "K2 tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("K2_NOTEBOOK_PARTITION", TUESDAY)  # not the default: the notebook must honour it
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("K2_SHARED_DATA", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nbclient.NotebookClient(nb, kernel_name="k2-test", timeout=300, resources={"metadata": {"path": str(run_dir)}}).execute()
    nbformat.write(nb, tmp_path / "explore.executed.ipynb")  # to look at when this fails
    by_tag = {tag: cell for cell in nb.cells for tag in cell.get("metadata", {}).get("tags", [])}

    setup = cell_text(nb.cells[1])
    assert f"K2_HOME   {k2_home}" in setup and f"partition {TUESDAY}" in setup
    assert f"{expected.num_rows:,} ASX trades on {TUESDAY}" in cell_text(by_tag["load-trades"])
    for tag in ("per-symbol", "duckdb"):
        rows = [line.split() for line in cell_text(by_tag[tag]).splitlines()]
        for symbol, n in counts.items():  # a wide frame's repr wraps, so a symbol may be on several lines
            assert any(symbol in row and str(n) in row for row in rows), (tag, symbol, n, cell_text(by_tag[tag]))
    ohlcv = cell_text(by_tag["ohlcv"])
    if dg.AssetKey("ohlcv_1m") in code_location.resolve_asset_graph().get_all_asset_keys():
        assert f"1 one-minute bars on {TUESDAY}" in ohlcv
    else:
        assert "ohlcv_1m is not part of this code location yet" in ohlcv
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert os.environ["K2_HOME"] == str(k2_home)

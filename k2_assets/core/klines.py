"""Binance's own 1m bars (klines) -> market.exchange_bars rows, from the public dumps or the REST API. No Dagster.

Dumps, anywhere under the history folder (USD-M futures under a futures/um/ path):
    SYMBOL-1m-YYYY-MM-DD[suffix].csv|.zip    open_time,open,high,low,close,volume,close_time,quote_volume,count,
                                             taker_buy_base_volume,taker_buy_quote_volume,ignore
with or without a header line; times in ms, or µs (spot from 2025), each judged by its magnitude. A file with
a header may carry fewer columns (at least open_time..volume, as freqtrade's OHLCV files): the rest are null.
REST: GET /api/v3/klines (spot), /fapi/v1/klines (futures), closed minutes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core import decode, schemas
from k2_assets.core.binance_format import BY_EXCHANGE, MICROS_FROM, SPOT, market_of_dump
from k2_assets.core.binance_history import read_dump
from k2_assets.core.binance_rest import get_json
from k2_assets.core.decode import Batch, Rows
from k2_assets.core.source_files import describe, file_rejects
from k2_assets.core.text import one_line

INTERVAL = "1m"
COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_base_volume",
    "taker_buy_quote_volume",
    "ignore",
)
REQUIRED = COLUMNS[:6]
# Other names the same columns go by in Binance's files (the futures dumps' header) and docs.
ALIASES = {
    "taker_buy_volume": "taker_buy_base_volume",
    "taker_buy_base_asset_volume": "taker_buy_base_volume",
    "taker_buy_quote_asset_volume": "taker_buy_quote_volume",
    "quote_asset_volume": "quote_volume",
    "number_of_trades": "count",
    "trades": "count",
}
FILE_PATTERN = re.compile(r"^(?P<symbol>[A-Z0-9]+)-1m-(?P<date>\d{4}-\d{2}-\d{2})(?P<suffix>[^/]*)\.(csv|zip)$")
MINUTE_US = 60_000_000


@dataclass(frozen=True)
class KlineFile:
    path: Path
    rel: str
    exchange: str
    symbol: str


def find_files(history_dir: Path, day: date) -> list[KlineFile]:
    """The day's 1m kline dumps (other intervals are not K2's to load)."""
    found = []
    for path in sorted(history_dir.rglob(f"*-1m-{day.isoformat()}*")):
        match = FILE_PATTERN.match(path.name)
        if match and match["date"] == day.isoformat():
            rel = path.relative_to(history_dir).as_posix()
            found.append(KlineFile(path, rel, market_of_dump(rel).exchange, match["symbol"]))
    return found


def load_day(history_dir: Path, day: date, *, source: str, now: datetime | None = None) -> Batch:
    """Every kline dump of `day`: each line is a bar or a rejected record with its reason; a file that cannot be
    read is one rejected record and the others load. A bar met twice (a .csv and its .zip) is kept once."""
    now = now or decode.utc_now()
    tables, rejects, files = [], [], []
    dumps = find_files(history_dir, day)
    for dump in dumps:
        ledger = describe(dump.path, dump.rel)
        files.append(ledger)
        if ledger.error is not None:
            continue
        try:
            rows, table = _decode(dump, read_dump(dump.path), day, now)
        except Exception as exc:  # noqa: BLE001 - one file that cannot be read must not stop the others
            ledger.error = one_line(exc)
            continue
        ledger.read, ledger.written, ledger.rejected = len(rows), table.num_rows, len(rows) - table.num_rows
        tables.append((ledger, table))
        rejects.append(
            decode.rejected_table(
                rows,
                rows.rejected(),
                source=source,
                partition_date=day,
                exchange=dump.exchange,
                symbol=dump.symbol,
                source_file=dump.rel,
                rejected_at=now,
            )
        )
    kept = _once(tables)
    symbols = {f.rel: f.symbol for f in dumps}
    rejects.append(file_rejects(files, source=source, partition_date=day, exchange=SPOT.exchange, now=now, symbols=symbols))
    bars = pa.concat_tables(kept) if kept else schemas.arrow_schema(schemas.EXCHANGE_BAR).empty_table()
    return Batch(bars, pa.concat_tables(rejects), files)


def _once(tables: list) -> list[pa.Table]:
    """Each (exchange, symbol, minute) once, first file first; a later copy counts as that file's duplicate."""
    seen: set = set()
    kept = []
    for ledger, table in tables:
        keys = list(zip(*(table.column(c).to_pylist() for c in ("exchange", "symbol", "bar_start"))))
        fresh = [k not in seen for k in keys]
        seen.update(keys)
        repeats = len(fresh) - sum(fresh)
        ledger.written -= repeats
        ledger.duplicates += repeats
        kept.append(table.filter(pa.array(fresh, pa.bool_())) if repeats else table)
    return kept


def _decode(dump: KlineFile, data: bytes, day: date, now: datetime) -> tuple[Rows, pa.Table]:
    lines = decode.read_lines(data)
    names, first_row = list(COLUMNS), 1
    header = lines.text[0].as_py().lstrip("\ufeff").strip() if len(lines) else ""
    if header.split(",")[0].strip().lower() == "open_time":
        names = [ALIASES.get(n.strip().lower(), n.strip().lower()) for n in header.split(",")]
        unknown = [n for n in names if n not in COLUMNS]
        if unknown or any(n not in names for n in REQUIRED):
            raise ValueError(f"header {header!r}: K2 reads the kline columns {', '.join(COLUMNS)} (at least open_time..volume)")
        lines, first_row = lines.slice(1), 2
    if len(lines) == 0:
        raise ValueError("the file is empty" if first_row == 1 else "the file has a header and no rows")
    rows = Rows(lines, len(names), first_row=first_row)
    text = dict(zip(names, rows.fields))
    opened = _timestamp(rows.integer(text["open_time"], "open_time"))
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    outside = pc.or_(
        pc.less(opened, pa.scalar(start, opened.type)),
        pc.greater_equal(opened, pa.scalar(start + timedelta(days=1), opened.type)),
    )
    rows.reject(outside, "open_time ", text["open_time"], f" is outside the UTC day {day}")
    prices = {n: rows.decimal(text[n], n) for n in ("open", "high", "low", "close")}
    amounts = {
        n: rows.decimal(text[n], n, positive=False)
        for n in names
        if n in ("volume", "quote_volume", "taker_buy_base_volume", "taker_buy_quote_volume")
    }
    closed = _timestamp(rows.integer(text["close_time"], "close_time")) if "close_time" in text else _minute_end(opened)
    count = rows.integer(text["count"], "count") if "count" in text else pa.nulls(len(rows), pa.int64())
    _reject_inconsistent(rows, prices, opened, closed)
    ok = rows.accepted()
    n = len(ok)
    take = lambda column: pc.take(column, ok)  # noqa: E731
    columns = {
        "exchange": pa.repeat(pa.scalar(dump.exchange), n),
        "symbol": pa.repeat(pa.scalar(dump.symbol), n),
        "interval": pa.repeat(pa.scalar(INTERVAL), n),
        "bar_start": take(opened),
        "bar_end": _minute_end(take(opened)),
        "trade_date": pa.repeat(pa.scalar(day, pa.date32()), n),
        **{n_: take(v) for n_, v in prices.items()},
        "volume": take(amounts["volume"]),
        "quote_volume": take(amounts["quote_volume"]) if "quote_volume" in amounts else pa.nulls(n, pa.decimal128(18, 8)),
        "trade_count": take(count),
        "taker_buy_volume": take(amounts["taker_buy_base_volume"])
        if "taker_buy_base_volume" in amounts
        else pa.nulls(n, pa.decimal128(18, 8)),
        "taker_buy_quote_volume": take(amounts["taker_buy_quote_volume"])
        if "taker_buy_quote_volume" in amounts
        else pa.nulls(n, pa.decimal128(18, 8)),
        "source": pa.repeat(pa.scalar("dump"), n),
        "source_file": pa.repeat(pa.scalar(dump.rel), n),
        "fetched_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
    }
    return rows, schemas.build_table(schemas.EXCHANGE_BAR, columns, n)


def _timestamp(epoch: pa.Array) -> pa.Array:
    micros = pc.if_else(pc.greater_equal(epoch, MICROS_FROM), epoch, pc.multiply(epoch, 1000))
    return pc.cast(micros, pa.timestamp("us", tz="UTC"))


def _reject_inconsistent(rows: Rows, prices: dict, opened: pa.Array, closed: pa.Array) -> None:
    """A bar that cannot be one: its high below another price, its low above one, or its minute not one minute."""
    high, low = prices["high"], prices["low"]
    for name in ("open", "close", "low"):
        rows.reject(pc.less(high, prices[name]), f"high is below {name}")
    for name in ("open", "close"):
        rows.reject(pc.greater(low, prices[name]), f"low is above {name}")
    epoch = pc.cast(opened, pa.int64())
    off_minute = pc.not_equal(pc.multiply(pc.divide(epoch, MINUTE_US), MINUTE_US), epoch)  # integer division
    rows.reject(off_minute, "open_time is not the start of a minute")
    span = pc.subtract(pc.cast(closed, pa.int64()), pc.cast(opened, pa.int64()))
    # close_time is the minute's last millisecond (ms dumps) or microsecond (µs dumps)
    rows.reject(
        pc.invert(pc.is_in(span, pa.array([MINUTE_US - 1000, MINUTE_US - 1]))), "close_time does not end open_time's minute"
    )


def _minute_end(opened: pa.Array) -> pa.Array:
    return pc.cast(pc.add(pc.cast(opened, pa.int64()), MINUTE_US - 1), pa.timestamp("us", tz="UTC"))


def fetch_day(
    base_url: str, exchange: str, symbol: str, day: date, *, now: datetime | None = None, api_key: str | None = None
) -> pa.Table:
    """The exchange's closed 1m bars of `symbol` on `day` from its REST API (paged), as exchange_bars rows.

    Closed by the exchange's own clock (`now`: its server time, asked first), not this machine's."""
    market = BY_EXCHANGE[exchange]
    if now is None:
        server_ms = get_json(base_url, f"{market.rest_prefix}/time", {}, api_key)["serverTime"]
        now = datetime.fromtimestamp(server_ms / 1000, tz=UTC)
    now_ms = int(now.timestamp() * 1000)
    start_ms = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    end_ms = min(start_ms + 86_400_000, now_ms) - 1
    rows, cursor = [], start_ms
    path, limit = f"{market.rest_prefix}/klines", market.klines_max_limit
    while cursor <= end_ms:
        params = {"symbol": symbol, "interval": INTERVAL, "startTime": cursor, "endTime": end_ms, "limit": limit}
        page = get_json(base_url, path, params, api_key)
        rows += [k for k in page if k[6] < now_ms]  # only minutes the exchange has closed
        if len(page) < limit:
            break
        cursor = page[-1][0] + 60_000
    return rest_rows(rows, exchange, symbol, day, decode.utc_now(), f"rest:{path}?symbol={symbol}")


def rest_rows(klines: list[list], exchange: str, symbol: str, day: date, now: datetime, path: str) -> pa.Table:
    """REST kline arrays -> exchange_bars rows (the arrays are Binance's: ms times, decimal strings)."""
    n = len(klines)
    column = lambda i, kind: pa.array([k[i] for k in klines], kind)  # noqa: E731
    decimal = lambda i: pc.cast(column(i, pa.string()), pa.decimal128(28, 8))  # noqa: E731
    ms = lambda i: pc.cast(pc.multiply(column(i, pa.int64()), 1000), pa.timestamp("us", tz="UTC"))  # noqa: E731
    columns = {
        "exchange": pa.repeat(pa.scalar(exchange), n),
        "symbol": pa.repeat(pa.scalar(symbol), n),
        "interval": pa.repeat(pa.scalar(INTERVAL), n),
        "bar_start": ms(0),
        "bar_end": _minute_end(ms(0)),
        "trade_date": pa.repeat(pa.scalar(day, pa.date32()), n),
        "open": decimal(1),
        "high": decimal(2),
        "low": decimal(3),
        "close": decimal(4),
        "volume": decimal(5),
        "quote_volume": decimal(7),
        "trade_count": column(8, pa.int64()),
        "taker_buy_volume": decimal(9),
        "taker_buy_quote_volume": decimal(10),
        "source": pa.repeat(pa.scalar("rest"), n),
        "source_file": pa.repeat(pa.scalar(path), n),
        "fetched_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
    }
    return schemas.build_table(schemas.EXCHANGE_BAR, columns, n)

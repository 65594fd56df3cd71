"""Binance public trade dumps (data.binance.vision) -> v2 trades of one market for one UTC date.

Files in the history directory (any depth), as Binance publishes them or redistributed:
    SYMBOL-trades-YYYY-MM-DD[suffix].csv|.zip      trade_id,price,qty,quote_qty,time,is_buyer_maker[,is_best_match]
    SYMBOL-aggTrades-YYYY-MM-DD[suffix].csv|.zip   agg_trade_id,price,quantity,first_trade_id,last_trade_id,time,
                                                   is_buyer_maker[,is_best_match]
with or without a header line. Times are epoch milliseconds before 2025-01-01 and microseconds from
then on (Binance switched the spot dumps); each value is judged on its own magnitude.

A dump under a futures/um/ folder is USD-M futures (exchange BINANCE_UM), any other spot (BINANCE); a load
takes one market's files. Futures dumps have a header line and no is_best_match, and Binance publishes no
trade class (X) in them: a header column named X or type is read as the class, otherwise every trade is
MARKET (docs/binance-futures.md).

source_sequence is the exchange's trade id (contiguous per symbol) or, for aggTrades, the aggregate
id (also contiguous). When both kinds exist for a symbol and day, the raw trades win and the
aggTrades file is reported as skipped, since loading both would count the same volume twice.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core import decode, schemas
from k2_assets.core.binance_format import (
    MICROS_FROM,
    PRICE_FORMING_CLASS,
    SPOT,
    TRADE_CLASSES,
    Market,
    market_of_dump,
    quote_currency,
)
from k2_assets.core.decode import Batch, Rows
from k2_assets.core.source_files import describe, file_rejects
from k2_assets.core.text import one_line

EXCHANGE = SPOT.exchange
HEADER_FIRST_COLUMNS = {"id", "trade_id", "agg_trade_id", "a"}  # a first line that starts so is the header
CLASS_COLUMNS = ("x", "type")  # a header column of these names holds the trade class (futures' X)
FIRST_DAY = date(2017, 7, 14)  # Binance's first trading day, the first partition (binance_days)
KLINES_PATTERN = re.compile(r"^[A-Z0-9]+-\d+[smhdwM]-\d{4}-\d{2}-\d{2}.*\.(csv|zip)$")
FILE_PATTERN = re.compile(
    r"^(?P<symbol>[A-Z0-9]+)-(?P<kind>trades|aggTrades)-(?P<date>\d{4}-\d{2}-\d{2})(?P<suffix>[^/]*)\.(?P<ext>csv|zip)$"
)


@dataclass(frozen=True)
class DumpFile:
    path: Path
    symbol: str
    kind: str  # "trades" or "aggTrades"
    day: date


@dataclass(frozen=True)
class Found:
    """The dumps of one day, and the files that look like dumps but that no Binance partition can own."""

    dumps: list[DumpFile]
    unrecognised: dict[Path, str]  # path -> why


def find_files(history_dir: Path, day: date | None = None, market: Market = SPOT) -> Found:
    """The dumps of `market` (of `day`, or of every day), and the files in its part of the folder that are none."""
    dumps, unrecognised = [], {}
    for path in sorted(history_dir.rglob("*")):
        if not path.name.lower().endswith((".csv", ".zip")) or (path.is_dir() and not FILE_PATTERN.match(path.name)):
            continue  # a broken link, or a folder named like a dump, is kept: a file that cannot be read
        if KLINES_PATTERN.match(path.name):
            continue  # bars, not trades: another loader's files
        if market_of_dump(path.relative_to(history_dir).as_posix()) is not market:
            continue
        match = FILE_PATTERN.match(path.name)
        try:
            file_day = date.fromisoformat(match["date"]) if match else None
        except ValueError:
            file_day = None
        if file_day is None:
            unrecognised[path] = "the name does not parse as SYMBOL-trades-YYYY-MM-DD.csv|zip (or aggTrades)"
        elif file_day < FIRST_DAY:
            unrecognised[path] = f"dated {file_day}, before {FIRST_DAY}, the first Binance partition"
        elif day is None or file_day == day:
            dumps.append(DumpFile(path, match["symbol"], match["kind"], file_day))
    return Found(dumps, unrecognised)


def read_dump(path: Path) -> bytes:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".csv")]
            if len(members) != 1:
                raise ValueError(f"expected one .csv inside the zip, found {members}")
            return archive.read(members[0])
    return path.read_bytes()


def load_day(
    history_dir: Path, day: date, *, source: str, market: Market = SPOT, now: datetime | None = None
) -> tuple[Batch, list[str]]:
    """Decode every dump of `market` for `day`; returns the batch and notes on files skipped or not read.

    A file that cannot be read (empty, a corrupt zip, a name no partition owns) gives one rejected record
    and the others load. A trade id met twice in the day is written once: an exact repeat is skipped and
    counted, a repeat with other values is rejected with its reason."""
    now = now or decode.utc_now()
    found = find_files(history_dir, day, market)
    raw_symbols = {f.symbol for f in found.dumps if f.kind == "trades"}
    decoded, files, notes = [], [], []
    for path, why in found.unrecognised.items():
        ledger = describe(path, path.relative_to(history_dir).as_posix())
        ledger.error = ledger.error or why
        files.append(ledger)
    for dump in found.dumps:
        ledger = describe(dump.path, dump.path.relative_to(history_dir).as_posix())
        files.append(ledger)
        if ledger.error is not None:
            continue
        try:
            lines, first_row, header = _data_lines(read_dump(dump.path))
            if dump.kind == "aggTrades" and dump.symbol in raw_symbols:
                # Both kinds of one symbol-day hold the same volume: the raw trades are loaded, these lines are theirs.
                ledger.read = ledger.duplicates = len(lines)
                notes.append(
                    f"{ledger.path}: {len(lines)} lines skipped, raw trades for {dump.symbol} on {day} are loaded instead"
                )
                continue
            rows, table = _decode(dump, lines, first_row, header, day, ledger.path, now, market)
        except Exception as exc:  # noqa: BLE001 - one file that cannot be read must not stop the others
            ledger.error = one_line(exc)
            continue
        ledger.read, ledger.written, ledger.rejected = len(rows), table.num_rows, len(rows) - table.num_rows
        decoded.append((dump, ledger, rows, table))
    keep = _deduplicate(decoded)
    tables, rejects = [], []
    for (dump, ledger, rows, table), kept in zip(decoded, keep):
        tables.append(table if kept is None else table.filter(kept))
        rejected = rows.rejected()
        rejects.append(
            decode.rejected_table(
                rows,
                rejected,
                source=source,
                partition_date=day,
                exchange=market.exchange,
                symbol=dump.symbol,
                source_file=ledger.path,
                rejected_at=now,
                # A rejected row whose id is readable explains that id's absence from the table.
                sequences=_rejected_ids(rows, rejected),
            )
        )
    symbols = {d.path.relative_to(history_dir).as_posix(): d.symbol for d in found.dumps}
    rejects.append(file_rejects(files, source=source, partition_date=day, exchange=market.exchange, now=now, symbols=symbols))
    schema = schemas.arrow_schema(schemas.TRADE)
    return Batch(pa.concat_tables(tables) if tables else schema.empty_table(), pa.concat_tables(rejects), files), notes


CONTENT = ("price", "quantity", "exchange_timestamp", "side")  # what an exact repeat repeats


def _deduplicate(decoded: list) -> list[pa.BooleanArray | None]:
    """Each trade id once per day, first come first kept (file order, then line order): a later exact repeat
    is skipped and counted; one with other values is rejected. Returns, per file, the table rows to keep.

    Vectorized: a day may hold the same dump twice (a .csv and its .zip), a million repeats."""
    tables = [table for _, _, _, table in decoded]
    ids = pa.chunked_array([t.column("message_id") for t in tables], pa.string())
    total = len(ids)
    if total == 0 or pc.count_distinct(ids).as_py() == total:
        return [None] * len(decoded)
    sizes = np.array([t.num_rows for t in tables])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(len(tables)), sizes)
    combined = pa.table({"id": ids, "pos": np.arange(total)})
    firsts = combined.group_by("id", use_threads=False).aggregate([("pos", "min")])
    repeats = combined.join(firsts, "id").filter(pc.not_equal(pc.field("pos"), pc.field("pos_min"))).sort_by("pos")
    pos, first = repeats.column("pos").to_numpy(), repeats.column("pos_min").to_numpy()

    def column(name: str, at: np.ndarray) -> pa.Array:
        return pa.chunked_array([t.column(name) for t in tables]).take(pa.array(at))

    def content(at: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(*(pc.cast(column(c, at), pa.string()) for c in CONTENT), "|")

    same = pc.equal(content(pos), content(first)).to_numpy(zero_copy_only=False)
    keep = np.ones(total, dtype=bool)
    keep[pos] = False
    for f, (_, ledger, rows, _table) in enumerate(decoded):
        mine = owner[pos] == f
        exact, conflicting = int((mine & same).sum()), mine & ~same
        ledger.written -= int(mine.sum())
        ledger.duplicates += exact
        ledger.rejected += int(conflicting.sum())
        if not conflicting.any():
            continue
        at, was = pos[conflicting], first[conflicting]
        lines = column("source_row", at).to_pylist()
        reasons = [
            f"trade id {trade_id} appears again with other values (first at {decoded[g][1].path} line {line})"
            for trade_id, g, line in zip(
                column("trade_id", at).to_pylist(), owner[was].tolist(), column("source_row", was).to_pylist()
            )
        ]
        mask = pc.is_in(rows.line_numbers, pa.array(lines, pa.int64()))  # ascending, as `lines` is
        rows.reject(mask, pc.replace_with_mask(pa.nulls(len(rows), pa.string()), mask, pa.array(reasons, pa.string())))
    return [pa.array(keep[s : s + n]) for s, n in zip(starts, sizes)]


def _data_lines(data: bytes) -> tuple[decode.Lines, int, list[str] | None]:
    """The dump's lines without its header, the line number of the first one, and the header's column names
    (lower case; None without a header). An empty dump is an error."""
    lines = decode.read_lines(data)
    first_row, header = 1, None
    names = [n.strip().lower() for n in lines.text[0].as_py().lstrip("\ufeff").split(",")] if len(lines) else []
    if names and names[0] in HEADER_FIRST_COLUMNS:
        lines, first_row, header = lines.slice(1), 2, names
    if len(lines) == 0:
        raise ValueError("the file is empty" if first_row == 1 else "the file has a header and no rows")
    return lines, first_row, header


def _rejected_ids(rows: Rows, rejected: pa.Array) -> pa.Array:
    """The trade ids of the rejected lines (null where unreadable): the first field is the id, also on a
    line with the wrong number of fields. Only the rejected lines are read, so a clean file costs nothing."""
    lines = rows.raw_lines(rejected)  # bytes: a line that is not UTF-8 may still start with a readable id
    return pc.cast(pc.cast(pc.struct_field(pc.extract_regex(lines, r"^(?P<id>\d{1,18}),"), [0]), pa.string()), pa.int64())


def _decode(
    dump: DumpFile,
    lines: decode.Lines,
    first_row: int,
    header: list[str] | None,
    day: date,
    rel: str,
    now: datetime,
    market: Market,
) -> tuple[Rows, pa.Table]:
    agg = dump.kind == "aggTrades"
    base = 8 if agg else 7
    class_at = next((i for i, name in enumerate(header or ()) if name in CLASS_COLUMNS), None)
    if class_at is not None:
        n_fields = len(header)
    else:
        # The optional is_best_match column: a file has it on every line or on none; the lines decide by majority,
        # so one odd line cannot make every other line wrong.
        widths = pc.list_value_length(pc.split_pattern(lines.text, ","))
        with_best = pc.sum(pc.equal(widths, base)).as_py() or 0
        n_fields = base if with_best > (pc.sum(pc.equal(widths, base - 1)).as_py() or 0) else base - 1
    rows = Rows(lines, n_fields, first_row=first_row)
    fields = [f for i, f in enumerate(rows.fields) if i != class_at]
    if agg:
        id_s, price_s, qty_s, first_s, last_s, time_s, maker_s = fields[:7]
    else:
        id_s, price_s, qty_s, _quote_qty, time_s, maker_s = fields[:6]
    best_s = fields[base - 1] if len(fields) >= base else None

    trade_id = rows.integer(id_s, "agg_trade_id" if agg else "trade_id")
    price = rows.decimal(price_s, "price")
    quantity = rows.decimal(qty_s, "quantity")
    epoch = rows.integer(time_s, "time")
    micros = pc.if_else(pc.greater_equal(epoch, MICROS_FROM), epoch, pc.multiply(epoch, 1000))
    ts = pc.cast(micros, pa.timestamp("us", tz="UTC"))
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    outside = pc.or_(pc.less(ts, pa.scalar(start, ts.type)), pc.greater_equal(ts, pa.scalar(start + timedelta(days=1), ts.type)))
    rows.reject(outside, "time ", time_s, f" is outside the UTC day {day}")
    maker = pc.utf8_lower(maker_s)
    rows.reject(pc.invert(pc.is_in(maker, pa.array(["true", "false"]))), "is_buyer_maker '", maker_s, "' is not True or False")
    currency = quote_currency(dump.symbol)
    if currency is None:
        rows.reject(pa.repeat(True, len(rows)), f"no known quote currency at the end of symbol {dump.symbol}")
    if class_at is None:
        trade_class = pa.repeat(pa.scalar(PRICE_FORMING_CLASS), len(rows))
    else:
        trade_class = pc.utf8_trim_whitespace(rows.fields[class_at])
        rows.reject(
            pc.invert(pc.is_in(trade_class, pa.array(TRADE_CLASSES))),
            "trade class '",
            trade_class,
            f"' is not one of {', '.join(TRADE_CLASSES)}",
        )
    vendor_keys, vendor_cols = [], []
    if agg:
        first_id = rows.integer(first_s, "first_trade_id")
        last_id = rows.integer(last_s, "last_trade_id")
        vendor_keys += ["record_type", "first_trade_id", "last_trade_id"]
        vendor_cols += [
            pa.repeat(pa.scalar("aggTrade"), len(rows)),
            pc.cast(first_id, pa.string()),
            pc.cast(last_id, pa.string()),
        ]
    if best_s is not None:
        vendor_keys.append("is_best_match")
        vendor_cols.append(best_s)

    ok = rows.accepted()
    n = len(ok)
    ids = pc.take(trade_id, ok)
    classes = pc.take(trade_class, ok)
    prefix = f"{market.exchange}:{dump.symbol}:" + ("agg:" if agg else "")
    columns = {
        "message_id": pc.binary_join_element_wise(prefix, pc.cast(ids, pa.string()), ""),
        "trade_id": pc.cast(ids, pa.string()),
        "exchange": pa.repeat(pa.scalar(market.exchange), n),
        "symbol": pa.repeat(pa.scalar(dump.symbol), n),
        "asset_class": pa.repeat(pa.scalar("CRYPTO"), n),
        "currency": pa.repeat(pa.scalar(currency or ""), n),
        # is_buyer_maker means the seller was the taker: the aggressor sold.
        "side": pc.if_else(pc.equal(pc.take(maker, ok), "true"), "SELL", "BUY"),
        "price": pc.take(price, ok),
        "quantity": pc.take(quantity, ok),
        "exchange_timestamp": pc.take(ts, ok),
        "trade_date": pa.repeat(pa.scalar(day, pa.date32()), n),
        "ingest_timestamp": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
        "source_sequence": ids,
        "trade_conditions": pa.repeat(pa.scalar([], pa.list_(pa.string())), n),
        "venue": pa.nulls(n, pa.string()),
        "vendor_data": decode.string_map(vendor_keys, [pc.take(c, ok) for c in vendor_cols], n)
        if vendor_keys
        else pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()), pa.array([], pa.string())),
        "source_file": pa.repeat(pa.scalar(rel), n),
        "source_row": pc.take(rows.line_numbers, ok),
        "trade_class": classes,
        "price_forming": pc.equal(classes, PRICE_FORMING_CLASS),
    }
    return rows, schemas.build_table(schemas.TRADE, columns, n)

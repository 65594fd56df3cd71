"""Vectorized decoding of delimited vendor files: every row is either a typed value or a reason.

Rows are kept in vendor order with their 1-based line numbers. Each validation step records the
first reason a row fails; nothing is rounded, coerced or dropped without a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from k2_assets.core import schemas
from k2_assets.core.source_files import SourceFile

DECIMAL = pa.decimal128(18, 8)
# decimal(18,8): at most 10 integer digits and 8 fractional ones; more fractional digits only if zeros.
DECIMAL_PATTERN = schemas.DECIMAL_PATTERN
NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
INTEGER_PATTERN = r"^\d{1,18}$"
# The contracts' map<string,string> and list<string>: no null inside (a null value leaves its key out), so
# columns built as these need no cast on their way into a table.
STRING_MAP = pa.map_(pa.string(), pa.field("value", pa.string(), nullable=False))
STRING_LIST = pa.list_(pa.field("element", pa.string(), nullable=False))


def split_lines(data: bytes) -> pa.BinaryArray:
    """A file's lines as raw bytes: split on LF only, one CR before it dropped (CRLF). A CR anywhere else
    stays in its line, so line numbers are those of any text editor, whatever the bytes hold; a file with
    no LF at all but CRs has CR line endings."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    if len(newlines) == 0 and 13 in buf:  # no LF at all: a file with classic Mac (CR) line endings
        newlines = np.flatnonzero(buf == 13)
        buf = np.where(buf == 13, np.uint8(10), buf)
    tail = len(buf) > 0 and buf[-1] != 10  # a last line without its newline
    starts = np.concatenate([[0], newlines + 1])[: len(newlines) + tail]
    ends = np.concatenate([newlines, [len(buf)]])[: len(newlines) + tail]
    crlf = (ends > starts) & (ends < len(buf)) & (buf[np.maximum(ends - 1, 0)] == 13)
    ends = ends - crlf
    terminator = np.zeros(len(buf), dtype=bool)
    terminator[newlines] = True
    terminator[ends[crlf]] = True
    content = buf[~terminator]
    lengths = (ends - starts).astype(np.int64)
    large = len(content) >= 2**31 - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if large else np.int32)
    kind = pa.large_binary() if large else pa.binary()
    return pa.Array.from_buffers(kind, len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(content.tobytes())])


def utf8_or_raise(data: bytes) -> None:
    """ArrowInvalid unless `data` is UTF-8 (validated in place, no copy)."""
    offsets = np.array([0, len(data)], dtype=np.int64)
    pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]).cast(pa.large_string())


@dataclass
class Lines:
    """A file's lines: their text, and for files with bytes that are not UTF-8 the raw bytes and a reason per line."""

    text: pa.StringArray
    raw: pa.BinaryArray | None = None
    undecodable: pa.StringArray | None = None  # null where the line decoded

    def __len__(self) -> int:
        return len(self.text)

    def slice(self, start: int) -> Lines:
        return Lines(
            self.text.slice(start),
            None if self.raw is None else self.raw.slice(start),
            None if self.undecodable is None else self.undecodable.slice(start),
        )


def read_lines(data: bytes) -> Lines:
    """Split a file's bytes into lines (LF or CRLF), keeping empty lines so line numbers stay true. A line that
    is not UTF-8 becomes empty text with a reason, and its raw bytes are kept for market.rejected."""
    raw = split_lines(data)
    try:
        return Lines(raw.cast(pa.string()))
    except pa.ArrowInvalid:
        pass
    texts, reasons = [], []
    for line in raw.to_pylist():  # only files with a bad byte come here
        try:
            texts.append(line.decode("utf-8"))
            reasons.append(None)
        except UnicodeDecodeError as exc:
            texts.append("")
            reasons.append(f"line is not valid UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}")
    return Lines(pa.array(texts, pa.string()), raw, pa.array(reasons, pa.string()))


@dataclass
class Batch:
    """One partition's decode: rows for the table, rejected rows, and per vendor file what became of its lines.

    Every line read is written, rejected or skipped as a duplicate, file by file; a file that could not be
    read adds one rejected record of its own."""

    rows: pa.Table
    rejected: pa.Table
    files: list[SourceFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        unbalanced = [f.path for f in self.files if not f.balanced]
        if unbalanced:
            raise AssertionError(f"lines do not reconcile in {unbalanced}")
        failed = sum(f.error is not None for f in self.files)
        if self.read + failed != self.rows.num_rows + self.rejected.num_rows + self.duplicates:
            raise AssertionError(
                f"counts do not reconcile: read {self.read} + {failed} unreadable files != "
                f"{self.rows.num_rows} + {self.rejected.num_rows} + {self.duplicates} duplicates"
            )

    @property
    def read(self) -> int:
        return sum(f.read for f in self.files)

    @property
    def duplicates(self) -> int:
        return sum(f.duplicates for f in self.files)


class Rows:
    """The lines of one file split into fields, plus the first failure reason of each row."""

    def __init__(self, lines: Lines, n_fields: int, first_row: int = 1):
        self.lines = lines.text
        self.raw = lines.raw
        self.line_numbers = pa.array(np.arange(first_row, first_row + len(lines), dtype=np.int64))
        self.reasons: pa.Array = lines.undecodable if lines.undecodable is not None else pa.nulls(len(lines), pa.string())
        split = pc.split_pattern(lines.text, ",")
        lengths = pc.list_value_length(split)
        shape_ok = pc.equal(lengths, n_fields)
        self.first_field = pc.list_element(split, 0)
        self.reject(pc.invert(shape_ok), f"expected {n_fields} comma-separated fields, found ", pc.cast(lengths, pa.string()))
        if not pc.all(shape_ok).as_py():
            split = pc.if_else(shape_ok, split, pa.scalar([""] * n_fields, type=split.type))
        self.fields = [pc.list_element(split, i) for i in range(n_fields)]

    @classmethod
    def parse(cls, data: bytes, n_fields: int) -> Rows:
        """Split a headerless file with Arrow's CSV reader; any odd row sends the whole file down the
        line-by-line path, which gives every row its exact reason and line number."""
        names = [f"f{i}" for i in range(n_fields)]
        odd: list = []
        try:
            utf8_or_raise(data)  # bytes that are not UTF-8 go the line-by-line way
        except pa.ArrowInvalid:
            return cls(read_lines(data), n_fields)
        try:
            table = pcsv.read_csv(
                pa.BufferReader(data),  # zero-copy: a Python file object would be read under the GIL
                read_options=pcsv.ReadOptions(column_names=names, block_size=1 << 24),
                parse_options=pcsv.ParseOptions(
                    quote_char=False, ignore_empty_lines=False, invalid_row_handler=lambda row: odd.append(row) or "skip"
                ),
                convert_options=pcsv.ConvertOptions(
                    column_types={n: pa.string() for n in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid:
            odd.append(None)
        if (
            odd
            # numpy counts LFs four times as fast as bytes.count (0.5 against 2 ms for 4 MB), for a file-sized mask
            or table.num_rows
            != np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10) + (0 if data.endswith(b"\n") or not data else 1)
            or (table.num_rows and pc.any(pc.equal(table.column(0), "")).as_py())
        ):
            return cls(read_lines(data), n_fields)
        rows = object.__new__(cls)
        rows.fields = [c.combine_chunks() for c in table.columns]
        rows.first_field = rows.fields[0]
        rows.line_numbers = pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64))
        rows.reasons = pa.nulls(table.num_rows, pa.string())
        rows._lines = None
        rows.raw = None
        return rows

    @property
    def lines(self) -> pa.StringArray:
        """The raw lines; rebuilt from the fields when parsed by the CSV reader (exact: there is no quoting)."""
        if self._lines is None:
            self._lines = pc.binary_join_element_wise(*self.fields, ",")
        return self._lines

    @lines.setter
    def lines(self, value: pa.StringArray) -> None:
        self._lines = value

    @classmethod
    def clean(cls, n: int) -> Rows:
        """`n` lines that all decoded (by the compiled scanner): no reasons, and no text, which only a rejected line needs."""
        rows = object.__new__(cls)
        rows._lines = rows.raw = rows.first_field = None
        rows.fields = []
        rows.line_numbers = pa.array(np.arange(1, n + 1, dtype=np.int64))
        rows.reasons = pa.nulls(n, pa.string())
        return rows

    @classmethod
    def from_reasons(cls, reasons: pa.Array) -> Rows:
        """Rows already parsed elsewhere (e.g. JSON messages): only their reasons are tracked here."""
        rows = object.__new__(cls)
        rows.lines = pa.nulls(len(reasons), pa.string())
        rows.raw = None
        rows.line_numbers = pa.nulls(len(reasons), pa.int64())
        rows.reasons = reasons
        rows.fields = []
        rows.first_field = rows.lines
        return rows

    def __len__(self) -> int:
        return len(self.reasons)

    def take(self, indices: pa.Array) -> Rows:
        """The subset of rows at `indices`, keeping line numbers and reasons."""
        subset = object.__new__(Rows)
        subset._lines = None if self._lines is None else pc.take(self._lines, indices)
        subset.raw = None if self.raw is None else pc.take(self.raw, indices)
        subset.line_numbers = pc.take(self.line_numbers, indices)
        subset.reasons = pc.take(self.reasons, indices)
        subset.fields = [pc.take(f, indices) for f in self.fields]
        subset.first_field = pc.take(self.first_field, indices)
        return subset

    def raw_lines(self, indices: pa.Array) -> pa.Array:
        """The lines at `indices` as the file had them, bytes and all."""
        return pc.take(self.raw, indices) if self.raw is not None else pc.cast(pc.take(self.lines, indices), pa.binary())

    def accepted(self) -> pa.Array:
        return pc.indices_nonzero(self.ok)

    def rejected(self) -> pa.Array:
        return pc.indices_nonzero(pc.invert(self.ok))

    @property
    def ok(self) -> pa.BooleanArray:
        return pc.is_null(self.reasons)

    def reject(self, mask: pa.BooleanArray, *message: pa.Array | str) -> None:
        """Record a reason for rows in `mask` that have none yet; the message parts (text or
        per-row arrays) are joined only for those rows. Arrays may be chunked (columns of a parsed table)."""
        mask, message = _contiguous(mask), [p if isinstance(p, str) else _contiguous(p) for p in message]
        fresh = pc.and_(pc.fill_null(mask, True), pc.is_null(self.reasons))
        where = pc.indices_nonzero(fresh)
        if len(where) == 0:
            return
        parts = [p if isinstance(p, str) else pc.take(p, where) for p in message]
        text = (
            pc.binary_join_element_wise(*parts, "")
            if len(parts) > 1
            else (pa.array([parts[0]] * len(where), pa.string()) if isinstance(parts[0], str) else parts[0])
        )
        self.reasons = pc.replace_with_mask(self.reasons, fresh, pc.cast(text, pa.string()))

    def decimal(self, values: pa.StringArray, name: str, positive: bool = True) -> pa.Array:
        """Parse exact decimal(18,8) values; bad ones get a reason, never a rounded value."""
        reasons, parsed = by_unique(values, lambda u: _decimal_unique(u, name, positive))
        self.reject(pc.is_valid(reasons), reasons)
        return parsed

    def integer(self, values: pa.StringArray, name: str) -> pa.Array:
        good = pc.match_substring_regex(values, INTEGER_PATTERN)
        self.reject(pc.invert(good), f"{name} '", values, "' is not a whole number")
        return pc.cast(pc.if_else(good, values, "0"), pa.int64())


def _contiguous(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def pick(column: pa.Array, indices: pa.Array) -> pa.Array:
    """`take`, but a zero-copy slice when the indices are one ascending run (a session in vendor order)."""
    n = len(indices)
    if n and indices[n - 1].as_py() - indices[0].as_py() + 1 == n:
        return column.slice(indices[0].as_py(), n)
    return pc.take(column, indices)


def patched(base: pa.Array, positions: pa.Array, patches: pa.Array) -> pa.Array:
    """`base` with its rows at `positions` (ascending) replaced by the rows of `patches`, in order."""
    pieces, last = [], 0
    for patch, at in enumerate(positions.to_pylist()):
        pieces += [base.slice(last, at - last), patches.slice(patch, 1)]
        last = at + 1
    return pa.concat_arrays([*pieces, base.slice(last)]) if pieces else base


def by_unique(values: pa.Array, fn):
    """Apply `fn` to the distinct values only and spread its results back (prices, dates repeat a lot)."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    results = fn(encoded.dictionary)
    if isinstance(results, tuple):
        return tuple(pc.take(r, encoded.indices) for r in results)
    return pc.take(results, encoded.indices)


def _decimal_unique(values: pa.StringArray, name: str, positive: bool) -> tuple[pa.Array, pa.Array]:
    fits = pc.match_substring_regex(values, DECIMAL_PATTERN)  # unsigned, no exponent: a number, never negative
    if pc.all(fits).as_py() is not False:
        parsed = pc.cast(values, DECIMAL)
        if not positive or pc.all(pc.greater(parsed, pa.scalar(0, DECIMAL))).as_py() is not False:
            return pa.nulls(len(values), pa.string()), parsed  # every value good: no reason text to build
    return _decimal_reasons(values, name, positive, fits)


def _decimal_reasons(values: pa.StringArray, name: str, positive: bool, fits: pa.BooleanArray) -> tuple[pa.Array, pa.Array]:
    reasons = pa.nulls(len(values), pa.string())

    def first(mask, reason):
        nonlocal reasons
        reasons = pc.if_else(pc.and_(pc.fill_null(mask, True), pc.is_null(reasons)), reason, reasons)

    first(
        pc.invert(pc.match_substring_regex(values, NUMBER_PATTERN)),
        pc.binary_join_element_wise(f"{name} '", values, "' is not a number", ""),
    )
    first(pc.starts_with(values, "-"), pc.binary_join_element_wise(f"{name} ", values, " is negative", ""))
    first(pc.invert(fits), pc.binary_join_element_wise(f"{name} ", values, " does not fit decimal(18,8) without rounding", ""))
    parsed = pc.cast(pc.if_else(fits, values, "0"), DECIMAL)
    if positive:
        first(
            pc.less_equal(parsed, pa.scalar(0, DECIMAL)),
            pc.binary_join_element_wise(f"{name} ", values, " must be greater than zero", ""),
        )
    return reasons, parsed


def parse_us_date(values: pa.StringArray) -> pa.Array:
    """MM/DD/YYYY -> date32, null where the text is not a real calendar date.

    A vendor file runs in date order: when every value is 10 bytes, each run of equal values is parsed once."""
    values = _contiguous(values)
    data = fixed_width_bytes(values, 10)
    if data is None:
        return by_unique(values, _parse_us_date_unique)
    n = len(values)
    # Each value as one 8-byte and one 2-byte word, so neighbours compare in two passes.
    head = np.ndarray((n,), dtype=np.uint64, buffer=data, strides=(10,))
    tail = np.ndarray((n,), dtype=np.uint16, buffer=data, offset=8, strides=(10,))
    starts = np.flatnonzero(np.concatenate([[True], (head[1:] != head[:-1]) | (tail[1:] != tail[:-1])]))
    per_run = by_unique(values.take(pa.array(starts)), _parse_us_date_unique)
    lengths = np.diff(np.append(starts, n))
    days = pc.fill_null(per_run.cast(pa.int32()), 0).to_numpy()
    missing = pc.is_null(per_run).to_numpy(zero_copy_only=False)
    return pa.array(np.repeat(days, lengths), pa.int32(), mask=np.repeat(missing, lengths)).cast(pa.date32())


def _parse_us_date_unique(values: pa.StringArray) -> pa.Array:
    # Year 0000 parses in Arrow, but no Python date holds it: not a calendar date.
    shaped = pc.and_(pc.match_substring_regex(values, r"^\d{2}/\d{2}/\d{4}$"), pc.invert(pc.ends_with(values, "/0000")))
    iso = pc.binary_join_element_wise(
        pc.utf8_slice_codeunits(values, 6, 10), pc.utf8_slice_codeunits(values, 0, 2), pc.utf8_slice_codeunits(values, 3, 5), "-"
    )
    iso = pc.if_else(shaped, iso, pa.scalar(None, pa.string()))
    return _iso_date(iso)


def _iso_date(iso: pa.StringArray) -> pa.Array:
    parsed = pc.cast(pc.strptime(iso, format="%Y-%m-%d", unit="s", error_is_null=True), pa.date32())
    # strptime rolls 02/30 over into March: accept only dates that print back the same.
    same = pc.equal(pc.strftime(parsed, format="%Y-%m-%d"), iso)
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, pa.date32()))


def parse_clock_micros(values: pa.StringArray) -> pa.Array:
    """HH:MM:SS[.ffffff] -> microseconds since midnight, null where malformed or out of range."""
    values = _contiguous(values)
    fixed = _clock_fixed_width(values)
    if fixed is not None:
        return fixed
    valid = pc.match_substring_regex(values, r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?$")
    safe = pc.if_else(valid, values, "00:00:00")
    micros = pc.cast(pc.cast(pc.binary_join_element_wise("1970-01-01T", safe, ""), pa.timestamp("us")), pa.int64())
    return pc.if_else(valid, micros, pa.scalar(None, pa.int64()))


def fixed_width_bytes(values: pa.Array, width: int) -> pa.Buffer | None:
    """The bytes of a (large) string array whose every value is `width` bytes long, none null, as one buffer;
    else None. Such a column can be read as a byte matrix, with no per-value string work."""
    n = len(values)
    if n == 0 or values.null_count:
        return None
    kind = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(values.buffers()[1], dtype=kind)[values.offset : values.offset + n + 1]
    if offsets[-1] - offsets[0] != width * n or (width and not (np.diff(offsets) == width).all()):
        return None
    return values.buffers()[2].slice(int(offsets[0]), width * n) if width else pa.py_buffer(b"")


def _clock_fixed_width(values: pa.StringArray) -> pa.Array | None:
    """The vendor's HH:MM:SS.mmm, read as a byte matrix (no per-row string work); None if not that shape."""
    data = fixed_width_bytes(values, 12)
    if data is None:
        return None
    n = len(values)
    chars = np.frombuffer(data, dtype=np.uint8, count=12 * n).reshape(n, 12)
    # One int32 column per digit: arithmetic on whole columns, not on a rows x digits matrix.
    d = [chars[:, i].astype(np.int32) - 48 for i in (0, 1, 3, 4, 6, 7, 9, 10, 11)]
    digits = np.logical_and.reduce([(x >= 0) & (x <= 9) for x in d])
    shaped = digits & (chars[:, 2] == 58) & (chars[:, 5] == 58) & (chars[:, 8] == 46)
    hh, mm, ss = d[0] * 10 + d[1], d[2] * 10 + d[3], d[4] * 10 + d[5]
    valid = shaped & (hh < 24) & (mm < 60) & (ss < 60)
    millis = ((hh * 60 + mm) * 60 + ss) * 1000 + d[6] * 100 + d[7] * 10 + d[8]
    return pa.array(millis.astype(np.int64) * 1000, pa.int64(), mask=~valid)


DAY_MICROS = 86_400_000_000
MAX_OFFSET_TABLE_DAYS = 200 * 366  # a batch spanning more days (corrupt dates) converts row by row


def local_to_utc(dates: pa.Array, clock_micros: pa.Array, tz: str) -> pa.Array:
    """Exchange-local date + time of day -> timestamp[us] in `tz`, as assume_timezone gives it (an ambiguous or
    nonexistent local time: the earliest instant).

    A zone's offset changes at a few instants a year. So every day whose offset is the same at its first and its
    last microsecond converts by that offset, one subtraction for all its rows; only the rows of a day with a change
    go through assume_timezone, which costs about ten times as much. This equals assume_timezone on every row for
    any zone that changes its offset at most once a day (every zone in the tz database)."""
    days = pc.cast(pc.cast(dates, pa.int32()), pa.int64())
    local = pc.add(pc.multiply(days, DAY_MICROS), clock_micros)
    kind = pa.timestamp("us", tz=tz)
    if len(local) == 0 or local.null_count:
        return _assume_timezone(local, tz).cast(kind)
    values = local.to_numpy()
    day = values // DAY_MICROS
    first, last = int(day.min()), int(day.max())
    if last - first > MAX_OFFSET_TABLE_DAYS:
        return _assume_timezone(local, tz).cast(kind)
    starts = np.arange(first, last + 1, dtype=np.int64) * DAY_MICROS
    edges = np.concatenate([starts, starts + DAY_MICROS - 1])  # each day's first and last microsecond, local
    offsets = edges - _assume_timezone(pa.array(edges), tz).to_numpy()
    at_start, at_end = offsets[: len(starts)], offsets[len(starts) :]
    index = day - first
    utc = values - at_start[index]
    changing = (at_start != at_end)[index]
    if changing.any():
        utc[changing] = _assume_timezone(pa.array(values[changing]), tz).to_numpy()
    return pa.array(utc, kind)


def _assume_timezone(local_micros: pa.Array, tz: str) -> pa.Array:
    """Local wall-clock microseconds -> UTC microseconds (int64), by Arrow's time-zone database."""
    naive = pc.cast(local_micros, pa.timestamp("us"))
    return pc.assume_timezone(naive, timezone=tz, ambiguous="earliest", nonexistent="earliest").cast(pa.int64())


def utc_now() -> datetime:
    return datetime.now(UTC)


def rejected_table(
    rows: Rows,
    indices: pa.Array,
    *,
    source: str,
    partition_date: date,
    exchange: str | None,
    symbol: str | None,
    source_file: str,
    rejected_at: datetime,
    sequences: pa.Array | None = None,
) -> pa.Table:
    """The market.rejected rows for `indices` of `rows`: raw line, position and reason."""
    n = len(indices)
    columns = {
        "source": pa.array([source] * n, pa.string()),
        "partition_date": pa.array([partition_date] * n, pa.date32()),
        "exchange": pa.array([exchange] * n, pa.string()),
        "symbol": pa.array([symbol] * n, pa.string()),
        "source_file": pa.array([source_file] * n, pa.string()),
        "source_row": pc.take(rows.line_numbers, indices),
        "kafka_topic": pa.nulls(n, pa.string()),
        "kafka_partition": pa.nulls(n, pa.int32()),
        "kafka_offset": pa.nulls(n, pa.int64()),
        "raw": rows.raw_lines(indices),
        "reason": pc.take(rows.reasons, indices),
        "rejected_at": pa.array([rejected_at] * n, pa.timestamp("us", tz="UTC")),
    }
    if sequences is not None:
        columns["source_sequence"] = sequences
    return schemas.build_table(schemas.REJECTED, columns, n)


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def string_map(keys: list[str], columns: list[pa.Array], n: int) -> pa.MapArray:
    """A map<string,string> per row from parallel value columns; null values leave the key out."""
    present = np.stack([pc.is_valid(c).to_numpy(zero_copy_only=False) for c in columns], axis=1)  # rows x keys
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    flat = np.flatnonzero(present.ravel())  # row-major cell positions
    rows_idx, key_idx = np.divmod(flat, len(keys))
    # concat_arrays of plain arrays: pa.chunked_array() over ChunkedArrays walks every value in Python.
    values = pa.concat_arrays([_array(c).cast(pa.string()) for c in columns])
    return pa.MapArray.from_arrays(
        pa.array(offsets),
        pa.array(keys, pa.string()).take(pa.array(key_idx)),
        values.take(pa.array(key_idx * n + rows_idx)),  # values are key-major
        type=STRING_MAP,
    )


def constant_map(entries: dict[str, str | None], n: int) -> pa.MapArray:
    """The same map<string,string> on each of `n` rows, as `string_map` gives it (a null value leaves its key out)."""
    keys = [key for key, value in entries.items() if value is not None]
    return pa.MapArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * len(keys)),
        tiled(keys, n),
        tiled([entries[key] for key in keys], n),
        type=STRING_MAP,
    )


def repeated(value: str, n: int) -> pa.StringArray:
    """`value` on each of `n` rows, built from its bytes (pa.repeat boxes a scalar and is five times slower)."""
    return tiled([value], n)


def tiled(pattern: list[str], n: int) -> pa.StringArray:
    """The strings of `pattern`, in order, `n` times over: built from bytes, with no per-value work."""
    parts = [text.encode() for text in pattern]
    block = b"".join(parts)
    if len(block) * n >= 2**31 - 1 and len(parts) == 1:  # past 32-bit offsets: as Arrow repeats a value
        return pa.repeat(pa.scalar(pattern[0], pa.string()), n)
    if not parts or len(block) * n >= 2**31 - 1:
        return pa.array(pattern * n, pa.string())
    width = len(parts)
    offsets = np.empty(width * n + 1, dtype=np.int32)
    starts = np.arange(n, dtype=np.int32) * np.int32(len(block))
    within = 0
    for position, part in enumerate(parts):  # one strided pass per part: numpy broadcasting is slow on 2 columns
        offsets[position:-1:width] = starts + np.int32(within)
        within += len(part)
    offsets[-1] = len(block) * n
    return pa.Array.from_buffers(pa.string(), width * n, [None, pa.py_buffer(offsets), pa.py_buffer(block * n)])

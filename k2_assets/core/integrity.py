"""Integrity of a stored trades partition: sequence gaps (reconciled into market.sequence_gaps) and
time order. Complements the row rules in checks.py; like them, each rule is a named asset check."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, EqualTo, In

from k2_assets.core import schemas, writer
from k2_assets.core.checks import SAMPLE_SIZE, Outcome, Rule
from k2_assets.core.id_runs import IdRuns

NO_UNEXPLAINED_GAPS = Rule(
    "no_unexplained_gaps", "every missing sequence number is explained (rejected row, exchange's answer)", blocking=False
)
TIME_MONOTONIC = Rule("time_monotonic_in_sequence", "exchange time never goes backwards in sequence order", blocking=False)
RULES = (NO_UNEXPLAINED_GAPS, TIME_MONOTONIC)
MAX_RANGES_SHOWN = 50


def holes(sequences: np.ndarray, start_at: int | None = None) -> list[tuple[int, int]]:
    """Missing ranges in a set of sequence numbers; from `start_at` when the numbering starts there."""
    return IdRuns.of(sequences).holes(start_at)


def partition_holes(
    trades: pa.Table, resets_each_session: bool, last_before: dict[str, int] | None = None
) -> dict[str, list[tuple[int, int]]]:
    """Per symbol, the sequence numbers missing from a partition (ASX numbering starts at 1 each session).

    `last_before` holds each symbol's last sequence number of the session before: numbering that runs
    on across sessions (Binance trade ids) then shows a gap that straddles midnight, in the session
    of the trade after it."""
    result = {}
    if trades.num_rows == 0:
        return result
    symbols = trades.column("symbol")
    for symbol in pc.unique(symbols).to_pylist():
        seq = trades.filter(pc.equal(symbols, symbol)).column("source_sequence").to_numpy(zero_copy_only=False)
        found = holes(seq, session_start(symbol, resets_each_session, last_before))
        if found:
            result[symbol] = found
    return result


def last_before(trades_table, exchange: str, session_date: date) -> dict[str, int]:
    """Each symbol's last sequence number in the session before `session_date`."""
    prev = trades_table.scan(
        row_filter=writer.partition_filter(exchange, session_date - timedelta(days=1)),
        selected_fields=("symbol", "source_sequence"),
    ).to_arrow()
    if not prev.num_rows:
        return {}
    last = prev.group_by("symbol").aggregate([("source_sequence", "max")])
    return dict(zip(last.column("symbol").to_pylist(), last.column("source_sequence_max").to_pylist()))


def session_start(symbol: str, resets_each_session: bool, last_before: dict[str, int] | None) -> int | None:
    """The first sequence number a session should hold: 1 where numbering resets, else one past the
    previous session's last (None when there is no previous session to go by)."""
    if resets_each_session:
        return 1
    last = (last_before or {}).get(symbol)
    return None if last is None else last + 1


def time_disorder(trades: pa.Table) -> Outcome:
    """Rows whose exchange time is earlier than the previous row's in sequence order, per symbol."""
    outcome = Outcome(TIME_MONOTONIC)
    if trades.num_rows == 0:
        return outcome
    ordered = trades.sort_by([("symbol", "ascending"), ("source_sequence", "ascending")])
    ts = ordered.column("exchange_timestamp").cast(pa.int64()).to_numpy()
    sym = pc.dictionary_encode(ordered.column("symbol")).combine_chunks().indices.to_numpy()
    backwards = np.flatnonzero((np.diff(ts) < 0) & (np.diff(sym) == 0)) + 1
    outcome.failed = len(backwards)
    sample = ordered.take(pa.array(backwards[:SAMPLE_SIZE])).select(
        ["message_id", "symbol", "source_sequence", "exchange_timestamp"]
    )
    outcome.sample = [{k: str(v) for k, v in row.items()} for row in sample.to_pylist()]
    return outcome


@dataclass(frozen=True)
class GapRange:
    symbol: str
    first: int
    last: int


def reconcile(
    existing: pa.Table,
    current: dict[str, list[tuple[int, int]]],
    *,
    exchange: str,
    session_date: date,
    detected_by: str,
    now: datetime,
    explained: dict[str, np.ndarray] | None = None,
    filled_how: str = "late_arrival",
    answers: dict[str, list[tuple[int, int, str]]] | None = None,
) -> pa.Table:
    """The partition's gap rows after comparing what was open with what is missing now.

    Closed rows are history and stay. An open row whose range is no longer missing is closed
    (`filled_how`); a range missing now that no open row covers is opened, keeping the detection
    time of the row it came from when an older gap was only partly filled."""
    rows = existing.to_pylist()
    now_missing = {GapRange(s, a, b) for s, ranges in current.items() for a, b in ranges}
    kept: list[dict] = []
    open_rows: dict[GapRange, dict] = {}
    for row in rows:
        if row["closed_at"] is None:
            open_rows[GapRange(row["symbol"], row["first_missing"], row["last_missing"])] = row
        else:
            kept.append(row)
    for key, row in open_rows.items():
        if key in now_missing:
            kept.append(row)
        else:
            kept.append({**row, "closed_at": now, "closed_how": filled_how})
    for key in sorted(now_missing - set(open_rows), key=lambda k: (k.symbol, k.first)):
        parent = next(
            (r for k, r in open_rows.items() if k.symbol == key.symbol and k.first <= key.first and key.last <= k.last), None
        )
        kept.append(
            {
                "exchange": exchange,
                "symbol": key.symbol,
                "session_date": session_date,
                "first_missing": key.first,
                "last_missing": key.last,
                "missing_count": key.last - key.first + 1,
                "detected_at": parent["detected_at"] if parent else now,
                "closed_at": None,
                "closed_how": None,
                "explained_by": None,
                "detected_by": detected_by,
            }
        )
    for row in kept:
        for first, last, answer in (answers or {}).get(row["symbol"], []):
            if row["closed_at"] is None and first <= row["first_missing"] and row["last_missing"] <= last:
                row["explained_by"] = answer
        if row["closed_at"] is None and explained and row["symbol"] in explained:
            span = np.arange(row["first_missing"], row["last_missing"] + 1)
            if np.isin(span, explained[row["symbol"]]).all():
                row["explained_by"] = f"{len(span)} rejected row(s) in market.rejected"
    return (
        pa.Table.from_pylist(kept, schema=schemas.arrow_schema(schemas.SEQUENCE_GAP))
        if kept
        else schemas.arrow_schema(schemas.SEQUENCE_GAP).empty_table()
    )


def gap_outcome(gap_rows: pa.Table) -> Outcome:
    """The no_unexplained_gaps result: open gaps with no explanation, their ranges in the sample."""
    outcome = Outcome(NO_UNEXPLAINED_GAPS)
    if gap_rows.num_rows == 0:
        return outcome
    unexplained = gap_rows.filter(pc.and_(pc.is_null(gap_rows.column("closed_at")), pc.is_null(gap_rows.column("explained_by"))))
    outcome.failed = int(pc.sum(unexplained.column("missing_count")).as_py() or 0)
    outcome.sample = [
        {"symbol": r["symbol"], "first_missing": r["first_missing"], "last_missing": r["last_missing"]}
        for r in unexplained.sort_by([("symbol", "ascending"), ("first_missing", "ascending")])
        .slice(0, MAX_RANGES_SHOWN)
        .to_pylist()
    ]
    return outcome


@dataclass(frozen=True)
class GapChanges:
    opened: int  # gap rows opened
    missing: int  # sequence numbers missing in them
    closed: dict[str, int]  # closed_how -> gap rows closed


def gap_changes(existing: pa.Table, rows: pa.Table) -> GapChanges:
    """What a reconcile changed: rows open now that were not open before, and rows closed since."""

    def open_keys(table: pa.Table) -> dict[tuple, int]:
        return {
            (r["symbol"], r["first_missing"], r["last_missing"]): r["missing_count"]
            for r in table.to_pylist()
            if r["closed_at"] is None
        }

    def closed_rows(table: pa.Table) -> Counter:
        return Counter(
            (r["symbol"], r["first_missing"], r["last_missing"], r["closed_at"], r["closed_how"])
            for r in table.to_pylist()
            if r["closed_at"] is not None
        )

    before, after = open_keys(existing), open_keys(rows)
    opened = {key: count for key, count in after.items() if key not in before}
    closed = Counter(row[4] for row in (closed_rows(rows) - closed_rows(existing)).elements())
    return GapChanges(len(opened), sum(opened.values()), dict(closed))


def gaps_of_day(exchange: str, session_date: date) -> BooleanExpression:
    """The rows of market.sequence_gaps that belong to one exchange session (partition)."""
    return And(EqualTo("exchange", exchange), EqualTo("session_date", session_date.isoformat()))


def reconcile_partition(
    gaps_table,
    current: dict[str, list[tuple[int, int]]],
    *,
    exchange: str,
    session_date: date,
    detected_by: str,
    now: datetime,
    explained: dict[str, np.ndarray] | None = None,
    filled_how: str = "late_arrival",
    answers: dict | None = None,
    metrics=None,
    symbols: list[str] | None = None,
) -> pa.Table:
    """Compare what a partition is missing now with its rows in market.sequence_gaps, and commit the result.

    `symbols` limits it to the symbols the caller knows (a live writer owns only some of them; the
    rows of the others stay as they are). metrics (a core.metrics.GapMetrics) counts the gaps opened
    and closed, once the commit is done."""
    where = gaps_of_day(exchange, session_date)
    if symbols is not None:
        where = And(where, In("symbol", set(symbols)) if symbols else EqualTo("symbol", "\x00none"))
    existing = gaps_table.scan(row_filter=where).to_arrow()
    rows = reconcile(
        existing,
        current,
        exchange=exchange,
        session_date=session_date,
        detected_by=detected_by,
        now=now,
        explained=explained,
        filled_how=filled_how,
        answers=answers,
    )
    if rows.num_rows or existing.num_rows:
        writer.replace_rows(gaps_table, rows, where, properties={"k2.source": detected_by})
    if metrics is not None:
        changes = gap_changes(existing, rows)
        metrics.record(exchange, changes.opened, changes.missing, changes.closed)
    return rows


def rejected_sequences(rejected: pa.Table) -> dict[str, np.ndarray]:
    """Per symbol, the sequence numbers that rejected rows would have had."""
    if rejected.num_rows == 0 or "source_sequence" not in rejected.column_names:
        return {}
    known = rejected.filter(pc.and_(pc.is_valid(rejected.column("source_sequence")), pc.is_valid(rejected.column("symbol"))))
    return {
        symbol: known.filter(pc.equal(known.column("symbol"), symbol)).column("source_sequence").to_numpy(zero_copy_only=False)
        for symbol in pc.unique(known.column("symbol")).to_pylist()
    }

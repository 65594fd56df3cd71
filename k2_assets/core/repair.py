"""Gap repair: fetch missing Binance trades by id from the exchange's REST API and write them once.

Binance serves any trade by id (`GET /api/v3/historicalTrades?symbol=&fromId=&limit=`, limit at
most 1000; the real endpoint wants an API key in `X-MBX-APIKEY`, taken from the environment).
USD-M futures serve them under `/fapi/v1/` and list market trades only, so a gap of insurance-fund
or ADL trades stays open with the exchange's answer. Repaired rows get the same message_id the
live stream would have given them, so a trade that arrives late after all is never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, EqualTo, In, IsNull
from pyiceberg.table import Table

from k2_assets.core import integrity, live_codec, live_decode, writer
from k2_assets.core.binance_format import PRICE_FORMING_CLASS, SPOT, Market
from k2_assets.core.binance_rest import ExchangeError, get_json
from k2_assets.core.kafka_batch import Messages
from k2_assets.core.live_dedup import KEYS_KEY, groups, keys_property

PAGE = 1000


@dataclass
class RepairReport:
    requested: int = 0
    written: int = 0
    already_present: int = 0
    unavailable: dict[tuple[str, int, int], str] = field(default_factory=dict)  # (symbol, first, last) -> answer
    snapshot_id: int | None = None


def rest_path(market: Market) -> str:
    return f"{market.rest_prefix}/historicalTrades"


def fetch(base_url: str, symbol: str, from_id: int, limit: int, api_key: str | None = None, market: Market = SPOT) -> list[dict]:
    return get_json(base_url, rest_path(market), {"symbol": symbol, "fromId": from_id, "limit": limit}, api_key)


def fetch_range(
    base_url: str, symbol: str, first: int, last: int, api_key: str | None = None, market: Market = SPOT
) -> tuple[list[dict], str | None]:
    """Trades with ids in [first, last]; the exchange's answer when some of them cannot be had."""
    found, next_id = [], first
    while next_id <= last:
        page = fetch(base_url, symbol, next_id, min(PAGE, last - next_id + 1), api_key, market)
        wanted = [t for t in page if next_id <= t["id"] <= last]
        if not wanted:
            return found, f"exchange returned no trades for ids {next_id}..{last} of {symbol}"
        found += wanted
        next_id = max(t["id"] for t in wanted) + 1
    have = {t["id"] for t in found}
    missing = [i for i in range(first, last + 1) if i not in have]
    return found, (
        f"exchange has no trades with ids {missing[:10]}{'...' if len(missing) > 10 else ''} of {symbol}" if missing else None
    )


def rows_from_rest(trades: list[dict], symbol: str, now: datetime, market: Market = SPOT) -> pa.Table:
    """Binance REST trades -> v2 rows, through the same codec as the live stream."""
    ingest_us = int(now.timestamp() * 1_000_000)

    def event(t: dict) -> dict:
        common = {"e": "trade", "E": t["time"], "s": symbol, "t": t["id"], "p": t["price"], "q": t["qty"], "T": t["time"]}
        # The futures trade lists hold market trades only, and say so nowhere: X is MARKET.
        extra = {"X": PRICE_FORMING_CLASS} if market.classified else {"M": t.get("isBestMatch", True)}
        return {**common, "m": t["isBuyerMaker"], **extra}

    values = [live_codec.message_from_event(event(t), ingest_us, market)[3] for t in trades]
    messages = Messages.of(values, [0] * len(values), [0] * len(values))
    rows, rejected = live_decode.decode_batch(messages, "", source="repair", exchange=market.exchange, now=now)
    if rejected.num_rows:
        raise ExchangeError(f"exchange returned trades K2 cannot accept: {rejected.column('reason').to_pylist()[:3]}")
    n = rows.num_rows
    for name, value in (
        ("kafka_topic", pa.nulls(n, pa.string())),
        ("kafka_partition", pa.nulls(n, pa.int32())),
        ("kafka_offset", pa.nulls(n, pa.int64())),
        ("source_file", pa.repeat(pa.scalar(f"rest:{rest_path(market)}"), n)),
    ):
        rows = rows.set_column(rows.schema.get_field_index(name), rows.schema.field(name), value)
    return rows


def repair_partition(
    trades: Table,
    gaps: Table,
    base_url: str,
    day: date,
    *,
    market: Market = SPOT,
    api_key: str | None = None,
    now: datetime | None = None,
) -> RepairReport:
    """Fill every open gap of `market`'s trades on `day` from its REST API; one Iceberg commit for all rows."""
    now = now or datetime.now(UTC)
    report = RepairReport()
    open_gaps = gaps.scan(row_filter=And(integrity.gaps_of_day(market.exchange, day), IsNull("closed_at"))).to_arrow().to_pylist()
    fetched = []
    for gap in open_gaps:
        symbol, first, last = gap["symbol"], gap["first_missing"], gap["last_missing"]
        report.requested += last - first + 1
        try:
            found, answer = fetch_range(base_url, symbol, first, last, api_key, market)
        except ExchangeError as exc:
            found, answer = [], str(exc)
        if found:
            fetched.append(rows_from_rest(found, symbol, now, market))
        if answer:
            report.unavailable[(symbol, first, last)] = answer
    if fetched:
        # A gap that straddles midnight belongs to the day after it, but its trades may be of the day before:
        # each repaired trade goes to its own trade_date.
        rows = pa.concat_tables(fetched)
        days = {d.isoformat() for d in rows.column("trade_date").to_pylist()}
        where = And(EqualTo("exchange", market.exchange), In("trade_date", days))
        existing = trades.scan(row_filter=where, selected_fields=("message_id",)).to_arrow()
        fresh = pc.invert(pc.is_in(rows.column("message_id"), value_set=existing.column("message_id")))
        report.already_present = rows.num_rows - int(pc.sum(fresh).as_py() or 0)
        rows = rows.filter(fresh)
        if rows.num_rows:
            keys = {key for key, _ in groups(rows)}
            trades.append(
                rows.sort_by(writer.SORT_KEYS),
                snapshot_properties={
                    "k2.source": "binance_gap_repair",
                    "k2.partition": day.isoformat(),
                    KEYS_KEY: keys_property(keys),
                },
            )
            report.written = rows.num_rows
    report.snapshot_id = trades.current_snapshot().snapshot_id if trades.current_snapshot() else None
    return report


def explanations(report: RepairReport) -> dict[str, list[tuple[int, int, str]]]:
    by_symbol: dict[str, list[tuple[int, int, str]]] = {}
    for (symbol, first, last), answer in report.unavailable.items():
        by_symbol.setdefault(symbol, []).append((first, last, answer))
    return by_symbol

"""The compliance report's section on the exchange's own bars: per day and market, the bars compared, the minutes
matching, and every minute that does not (core.reconcile, on the tables as they stand)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import date

from pyiceberg.catalog import Catalog
from pyiceberg.expressions import And, GreaterThanOrEqual, In, LessThanOrEqual

from k2_assets.core import catalog as k2_catalog
from k2_assets.core import reconcile
from k2_assets.core.binance_format import BY_EXCHANGE
from k2_assets.core.text import markdown_table

EXCHANGES = list(BY_EXCHANGE)  # the markets that publish bars K2 can prove its own against
SUMMARY = ("day", "market", "bars compared", "minutes matching", "mismatched", "missing data", "left out", "no exchange bars")
MINUTES = ("day", "market", "symbol", "minute (UTC)", "outcome", "why", "K2", "exchange")


@dataclass(frozen=True)
class DayMarket:
    day: str
    exchange: str
    compared: int
    matching: int
    mismatched: int
    missing_data: int
    left_out: int
    unreconciled: list[str]  # symbols K2 has bars of and the exchange's bars are not loaded for
    minutes: list[dict]  # every mismatch and missing-data minute


def collect(catalog: Catalog, start: date, end: date, track=lambda days: days) -> list[DayMarket]:
    """Every day in [start, end] with Binance bars in K2 or from the exchange, reconciled per market."""
    tables = {name: k2_catalog.ensure_table(catalog, name) for name in ("ohlcv_1m", "exchange_bars", "trades")}
    where = And(
        And(GreaterThanOrEqual("trade_date", start.isoformat()), LessThanOrEqual("trade_date", end.isoformat())),
        In("exchange", EXCHANGES),
    )
    days = set()
    for name in ("ohlcv_1m", "exchange_bars"):
        days |= set(tables[name].scan(row_filter=where, selected_fields=("trade_date",)).to_arrow().column(0).to_pylist())
    out = []
    for day in track(sorted(days)):
        result = reconcile.reconcile_day(tables["ohlcv_1m"], tables["exchange_bars"], tables["trades"], day)
        for exchange in EXCHANGES:
            summary = [r for r in result.summary.to_pylist() if r["exchange"] == exchange]
            unreconciled = [s for e, s in result.unreconciled if e == exchange]
            if not summary and not unreconciled:
                continue
            wrong = [
                m
                for m in result.minutes.to_pylist()
                if m["exchange"] == exchange and m["outcome"] in ("mismatch", "missing_data")
            ]
            total = {k: sum(r[k] for r in summary) for k in ("compared", "matching", "mismatched", "missing_data", "left_out")}
            out.append(DayMarket(day.isoformat(), exchange, **total, unreconciled=unreconciled, minutes=wrong))
    return out


def _values(minute: dict, side: str) -> str:
    fields = minute["fields"] or ["trade_count"]
    return ", ".join(f"{f} {minute[side][f]}" for f in fields)


def _rows(days: list[DayMarket]):
    summary = [
        (d.day, d.exchange, d.compared, d.matching, d.mismatched, d.missing_data, d.left_out, ", ".join(d.unreconciled))
        for d in days
    ]
    minutes = [
        (d.day, d.exchange, m["symbol"], f"{m['bar_start']:%H:%M}", m["outcome"], m["reason"], _values(m, "k2_values"),
         _values(m, "exchange_values"))
        for d in days
        for m in d.minutes
    ]  # fmt: skip
    return summary, minutes


def markdown(days: list[DayMarket]) -> str:
    summary, minutes = _rows(days)
    return "\n".join(
        [
            "## Against the exchange's own bars",
            "",
            f"{sum(d.compared for d in days)} bars compared, {sum(d.matching for d in days)} matching, "
            f"{len(minutes)} minutes that do not.",
            "",
            markdown_table(SUMMARY, summary),
            "",
            "### Every minute that does not match",
            "",
            markdown_table(MINUTES, minutes),
            "",
        ]
    )


def to_html(days: list[DayMarket]) -> str:
    summary, minutes = _rows(days)
    e = html.escape

    def table(head, rows, bad) -> str:
        cells = "".join(
            f"<tr class='{'bad' if bad(r) else 'ok'}'>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows
        )
        return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr>{cells}</table>"

    return (
        "<h2>Against the exchange's own bars</h2><p>Per day and market: K2's 1m bars compared with the exchange's, "
        "minute by minute (open, high, low, close, volume, trade count, quote and taker-buy volume).</p>"
        + table(SUMMARY, summary, lambda r: r[4] or r[5] or r[7])
        + "<h3>Every minute that does not match</h3>"
        + table(MINUTES, minutes, lambda r: True)
    )

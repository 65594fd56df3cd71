"""The SQL the engine runs: constant text over allowlisted identifiers, every value a bound `$name` parameter."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any


def quote(identifier: str) -> str:
    """Quote an identifier that has already been checked against an allowlist."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", identifier):
        raise AssertionError(f"identifier {identifier!r} did not come from an allowlist")
    return f'"{identifier}"'


def where(clauses: list[str]) -> str:
    """A WHERE clause of the conditions, or nothing when there are none."""
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def filters(
    exchange: str | None, symbol: str | None, start: datetime | None, end: datetime | None, time_column: str, session: date | None
) -> tuple[list[str], dict[str, Any]]:
    """SQL conditions (constant text) and their parameter values."""
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if exchange is not None:
        conditions.append("exchange = $exchange")
        params["exchange"] = exchange
    if symbol is not None:
        conditions.append("symbol = $symbol")
        params["symbol"] = symbol
    if start is not None:
        conditions.append(f"{quote(time_column)} >= $start")
        params["start"] = start
    if end is not None:
        conditions.append(f"{quote(time_column)} < $end")
        params["end"] = end
    if session is not None:
        conditions.append("trade_date = $trade_date")
        params["trade_date"] = session
    return conditions, params

"""The pandera rules on their own: each one fails on the row that breaks it, with a count and a sample."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from k2_assets.core import asx, checks, schemas

SESSION = date(2014, 3, 10)


@pytest.fixture(scope="module")
def trades(asx_dir) -> pd.DataFrame:
    return checks.to_frame(asx.load_session(asx_dir, SESSION, "trades", source="asx_trades").rows)


def test_real_partition_passes_every_rule(trades):
    outcomes = checks.validate(trades, "trades", "ASX", SESSION)
    assert [r.name for r in checks.TRADE_RULES] == list(outcomes)
    assert all(o.passed for o in outcomes.values())


def broken(trades, column, value, row=7):
    frame = trades.copy()
    frame[column] = frame[column].astype(object)
    frame.at[row, column] = value
    table = pa.Table.from_pandas(frame, schema=schemas.arrow_schema(schemas.TRADE), preserve_index=False)
    return checks.to_frame(table)


@pytest.mark.parametrize(
    "column,value,rule",
    [
        ("price", Decimal("0"), "price_positive"),
        ("quantity", Decimal("-5"), "quantity_positive"),
        ("symbol", "bhp!", "symbol_format"),
        ("exchange", "NYSE", "known_exchange"),
        ("currency", "XYZ", "known_currency"),
        ("side", "SIDEWAYS", "known_side"),
        ("trade_date", date(2014, 3, 11), "trade_date_is_partition"),
        ("exchange_timestamp", datetime(2014, 3, 10, 13, 0, tzinfo=UTC), "timestamp_in_session"),
        ("message_id", "ASX:BHP:20140310:1", "message_id_unique"),
    ],
)
def test_each_rule_catches_its_row(trades, column, value, rule):
    frame = broken(trades, column, value)
    outcomes = checks.validate(frame, "trades", "ASX", SESSION)
    failed = {name: o.failed for name, o in outcomes.items() if not o.passed}
    expected = 2 if rule == "message_id_unique" else 1  # both copies of a duplicate are shown
    assert failed == {rule: expected}
    sample = outcomes[rule].sample
    assert sample and frame.at[7, "message_id"] in {s["message_id"] for s in sample}
    assert sample[0]["source_file"] == frame.at[7, "source_file"] or rule == "message_id_unique"


def test_precision_rules_catch_values_outside_decimal_18_8():
    frame = pd.DataFrame({"price": [Decimal("1.5"), Decimal("1.123456789")], "quantity": [Decimal("1"), Decimal("12345678901")]})
    outcomes = checks.validate(frame.assign(**_filler(2)), "trades", "ASX", SESSION)
    assert outcomes["price_precision"].failed == 1 and outcomes["quantity_precision"].failed == 1


def _filler(n):
    ts = datetime(2014, 3, 9, 23, 30, tzinfo=UTC)
    return {
        "message_id": [f"m{i}" for i in range(n)],
        "symbol": ["BHP"] * n,
        "exchange": ["ASX"] * n,
        "currency": ["AUD"] * n,
        "side": ["UNKNOWN"] * n,
        "trade_date": [SESSION] * n,
        "exchange_timestamp": [ts] * n,
    }


def test_session_bounds_follow_the_exchange_time_zone():
    start, end = checks.session_bounds("ASX", SESSION)
    assert start == datetime(2014, 3, 9, 13, 0, tzinfo=UTC)  # midnight AEDT
    assert end == datetime(2014, 3, 10, 13, 0, tzinfo=UTC)
    start, end = checks.session_bounds("ASX", date(2014, 6, 10))  # AEST in winter
    assert start == datetime(2014, 6, 9, 14, 0, tzinfo=UTC)
    assert checks.session_bounds("BINANCE", SESSION)[0] == datetime(2014, 3, 10, tzinfo=UTC)


def test_a_frame_missing_columns_fails_every_rule():
    outcomes = checks.validate(pd.DataFrame({"price": [Decimal("1")]}), "trades", "ASX", SESSION)
    assert not any(o.passed for o in outcomes.values())

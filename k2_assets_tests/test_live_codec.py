"""The producer's v2 message, written from a template: for any event, exactly the contract's JSON, or a reason."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_assets.core import live_codec
from k2_assets.core.binance_format import SPOT, UM, quote_currency
from k2_assets.core.kafka_batch import Messages
from k2_assets.core.live_decode import decode_batch

anything = st.one_of(
    st.sampled_from(["btcusdt", 'BTC"USDT', "BTC\\USDT", "BTC\nUSDT", "BTCXYZ"]),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
)


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A field's valid values nine times in ten, else anything JSON may hold."""
    return st.integers(0, 9).flatmap(lambda k: anything if k == 0 else valid)


decimal = st.one_of(
    st.from_regex(r"\A[0-9]{1,10}\.[0-9]{1,8}\Z"),
    st.sampled_from(["1", "0.1", "0.00000000", "00.00", "1e3", "-1", " 1", "1.123456789", "12345678901"]),
)
EVENTS = st.fixed_dictionaries(
    {
        "e": mostly(st.just("trade")),
        "s": mostly(st.sampled_from(["BTCUSDT", "ETHBTC", "XRPETH", "ÜUSDT"])),
        "t": mostly(st.integers(0, 2**63 - 1)),
        "p": mostly(decimal),
        "q": mostly(decimal),
        "T": mostly(st.integers(1, 4_102_444_800_000)),
        "m": mostly(st.booleans()),
    },
    optional={
        "E": mostly(st.integers(0, 2**63)),
        "M": anything,
        "X": mostly(st.sampled_from(["MARKET", "ADL", "NA", "INSURANCE_FUND", "LIQ"])),
    },
)


def expected_trade(event: dict, ingest_us: int, market) -> dict:
    """The v2 trade the contract asks for, spelled out field by field."""
    trade_class = event["X"] if market.classified else "MARKET"
    vendor = {"event_time": str(event["E"])} if type(event.get("E")) is int else {}
    if "M" in event:
        vendor["is_best_match"] = str(event["M"])
    return {
        "message_id": f"{market.exchange}:{event['s']}:{event['t']}",
        "trade_id": str(event["t"]),
        "exchange": market.exchange,
        "symbol": event["s"],
        "asset_class": "CRYPTO",
        "currency": quote_currency(event["s"]),
        "side": "SELL" if event["m"] else "BUY",
        "price": event["p"],
        "quantity": event["q"],
        "exchange_timestamp": event["T"] * 1000,
        "trade_date": datetime.fromtimestamp(event["T"] / 1000, UTC).date().isoformat(),
        "ingest_timestamp": ingest_us,
        "source_sequence": event["t"],
        "trade_conditions": [],
        "venue": None,
        "vendor_data": vendor,
        "trade_class": trade_class,
        "price_forming": trade_class == "MARKET",
    }


@settings(max_examples=500, deadline=None)
@given(event=EVENTS, market=st.sampled_from([SPOT, UM]), ingest_us=st.integers(0, 2**62))
def test_every_event_becomes_the_contracts_message_or_a_reason(event, market, ingest_us):
    try:
        symbol, trade_id, trade_us, value = live_codec.message_from_event(event, ingest_us, market)
    except live_codec.InvalidEvent as exc:
        assert str(exc)
        return
    trade = orjson.loads(value)
    assert trade == expected_trade(event, ingest_us, market)
    assert list(trade) == list(expected_trade(event, ingest_us, market))  # the contract's field order too
    assert (symbol, trade_id, trade_us) == (trade["symbol"], trade["source_sequence"], trade["exchange_timestamp"])
    assert live_codec.trade_from_event(event, ingest_us, market) == trade
    rows, rejected = decode_batch(Messages.of([value], [0], [0]), "t", source="live", exchange=market.exchange)
    assert rejected.num_rows == 0, rejected.column("reason").to_pylist()
    assert rows.column("price").to_pylist()[0] is not None and rows.num_rows == 1

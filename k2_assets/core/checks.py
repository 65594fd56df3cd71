"""Data-quality rules for trades and quotes, as pandera schemas.

One module, two users: the Dagster asset checks run these on every partition as it stands in
Iceberg after a write, and the tests run them on hand-made frames. Each rule has a constant name,
which is the asset check's name in the UI and in compliance reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pandas as pd

_environ = dict(os.environ)
import pandera.pandas as pa  # noqa: E402
import pyarrow as arrow  # noqa: E402

# pandera's import sets PYARROW_IGNORE_TIMEZONE and SPARK_LOCAL_IP for pyspark, which K2 does not use;
# importing K2's core changes no environment variable.
for _name in set(os.environ) - set(_environ):
    del os.environ[_name]

EXCHANGES = {"ASX": "Australia/Sydney", "BINANCE": "UTC", "BINANCE_UM": "UTC"}
CURRENCIES = {"AUD", "USDT", "USDC", "FDUSD", "BUSD", "TUSD", "DAI", "BTC", "ETH", "BNB", "EUR", "GBP", "TRY", "BRL", "JPY"}
SYMBOL_PATTERNS = {"ASX": r"^[A-Z0-9]{3,6}$", "BINANCE": r"^[A-Z0-9]{5,20}$", "BINANCE_UM": r"^[A-Z0-9]{5,20}$"}
SAMPLE_SIZE = 5


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    blocking: bool = True  # severity ERROR; otherwise WARN


def _positive(s: pd.Series) -> pd.Series:
    return s > 0


# Each rule once: its name (the asset check's), what it says, the column it reads and its test. `bounds` is the
# partition: (session date, [start, end) in UTC, the exchange's symbol pattern).
COMMON_RULES = (
    (
        Rule("symbol_format", "symbol matches the exchange's symbol format"),
        "symbol",
        lambda bounds: lambda s: _text(s).str.fullmatch(bounds[2]),
    ),
    (Rule("known_exchange", "exchange is one K2 knows"), "exchange", lambda bounds: lambda s: s.isin(list(EXCHANGES))),
    (Rule("known_currency", "currency is one K2 knows"), "currency", lambda bounds: lambda s: s.isin(list(CURRENCIES))),
    (
        Rule("trade_date_is_partition", "trade_date equals the partition's session date"),
        "trade_date",
        lambda bounds: lambda s: s == bounds[0],
    ),
    (
        Rule("timestamp_in_session", "exchange_timestamp falls inside the partition's session day (exchange time zone)"),
        "exchange_timestamp",
        lambda bounds: lambda s: (s >= bounds[1][0]) & (s < bounds[1][1]),
    ),
    (
        Rule("message_id_unique", "no message_id appears twice in the partition"),
        "message_id",
        lambda bounds: lambda s: ~s.duplicated(keep=False),
    ),
)
TRADE_ROW_RULES = (
    (Rule("price_positive", "price > 0"), "price", lambda bounds: _positive),
    (Rule("quantity_positive", "quantity > 0"), "quantity", lambda bounds: _positive),
    (Rule("price_precision", "price fits decimal(18,8)"), "price", lambda bounds: _fits_decimal_18_8),
    (Rule("quantity_precision", "quantity fits decimal(18,8)"), "quantity", lambda bounds: _fits_decimal_18_8),
    (Rule("known_side", "side is BUY, SELL or UNKNOWN"), "side", lambda bounds: lambda s: s.isin(["BUY", "SELL", "UNKNOWN"])),
    *COMMON_RULES,
)
# Quote sides may be absent (a one-sided book): a missing bid or ask is not a failure.
QUOTE_ROW_RULES = (
    *(
        (
            Rule(f"{side}_{what}_positive", f"{side} {label} > 0 where {article} {side} is present"),
            f"{side}_{what}",
            lambda bounds: _positive,
        )
        for side, article in (("bid", "a"), ("ask", "an"))
        for what, label in (("price", "price"), ("quantity", "size"))
    ),
    *COMMON_RULES,
)
TRADE_RULES = tuple(rule for rule, _, _ in TRADE_ROW_RULES)
QUOTE_RULES = tuple(rule for rule, _, _ in QUOTE_ROW_RULES)


def rules(kind: str) -> tuple[Rule, ...]:
    return {"trades": TRADE_RULES, "quotes": QUOTE_RULES}[kind]


def session_bounds(exchange: str, session_date: date) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the exchange's session day."""
    tz = ZoneInfo(EXCHANGES[exchange])
    start = datetime.combine(session_date, time(0), tz)
    end = datetime.combine(session_date + timedelta(days=1), time(0), tz)
    return start.astimezone(ZoneInfo("UTC")), end.astimezone(ZoneInfo("UTC"))


def _text(s: pd.Series) -> pd.Series:
    return s.astype("string[pyarrow]")


def _fits_decimal_18_8(s: pd.Series) -> pd.Series:
    """True where the value is exact at 8 decimals with at most 10 integer digits."""
    dtype = getattr(s.dtype, "pyarrow_dtype", None)
    if dtype is not None and arrow.types.is_decimal(dtype) and dtype.scale <= 8 and dtype.precision - dtype.scale <= 10:
        return pd.Series(True, index=s.index)  # the column type already guarantees it
    step, limit = Decimal("1e-8"), Decimal("1e10")

    def fits(value) -> bool:
        d = Decimal(str(value))
        return d.is_finite() and d == d.quantize(step) and abs(d) < limit

    return s.map(fits).astype(bool)


def schema(kind: str, exchange: str, session_date: date) -> pa.DataFrameSchema:
    """The pandera schema for one partition (the session bounds depend on it), built from the rule table."""
    bounds = (session_date, session_bounds(exchange, session_date), SYMBOL_PATTERNS.get(exchange, r"^[A-Z0-9]{2,20}$"))
    checks: dict[str, list[pa.Check]] = {}
    for rule, column, test in TRADE_ROW_RULES if kind == "trades" else QUOTE_ROW_RULES:
        checks.setdefault(column, []).append(pa.Check(test(bounds), name=rule.name))
    nullable = {f"{side}_{what}" for side in ("bid", "ask") for what in ("price", "quantity")} if kind == "quotes" else set()
    columns = {column: pa.Column(nullable=column in nullable, checks=found) for column, found in checks.items()}
    return pa.DataFrameSchema(columns, name=f"{exchange.lower()}_{kind}", strict=False, coerce=False)


@dataclass
class Outcome:
    rule: Rule
    failed: int = 0
    sample: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failed == 0


SAMPLE_COLUMNS = ("message_id", "symbol", "source_file", "source_row", "kafka_offset")


def to_frame(table: arrow.Table) -> pd.DataFrame:
    """Arrow -> pandas with Arrow-backed dtypes, so decimals stay exact."""
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def validate(frame: pd.DataFrame, kind: str, exchange: str, session_date: date) -> dict[str, Outcome]:
    """Run every rule; the outcome of each carries its failing-row count and a sample of them."""
    outcomes = {rule.name: Outcome(rule) for rule in rules(kind)}
    if frame.empty:
        return outcomes
    frame = frame.reset_index(drop=True)
    try:
        schema(kind, exchange, session_date).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        for name, group in cases.groupby("check"):
            outcome = outcomes.get(str(name))
            if outcome is None:  # a structural error (missing column, wrong type) fails everything
                for o in outcomes.values():
                    o.failed = max(o.failed, len(frame))
                    o.sample = [{"error": f"{name}: {group['failure_case'].iloc[0]}"}]
                continue
            index = group["index"].dropna().astype(int).unique()
            outcome.failed = len(index)
            column = str(group["column"].iloc[0])
            keep = [c for c in dict.fromkeys((*SAMPLE_COLUMNS, column)) if c in frame.columns]
            sample = frame.loc[index[:SAMPLE_SIZE], keep]
            outcome.sample = [{k: _plain(v) for k, v in row.items()} for row in sample.to_dict("records")]
    return outcomes


def _plain(value):
    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return None
    return value if isinstance(value, (int, float, str, bool)) else str(value)

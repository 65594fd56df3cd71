"""What Binance's formats share, in one place: its markets, quote assets at the end of a symbol, ms versus µs
times, and the trade classes of the futures stream."""

from __future__ import annotations

from dataclasses import dataclass

QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "DAI", "BTC", "ETH", "BNB", "EUR", "GBP", "TRY", "BRL", "JPY")
MICROS_FROM = 10**14  # epoch ms stay below this until year 5138; epoch µs are above it since 1973

# X of a futures trade; only MARKET trades make Binance's klines (docs/binance-futures.md).
TRADE_CLASSES = ("MARKET", "INSURANCE_FUND", "ADL", "NA")
PRICE_FORMING_CLASS = "MARKET"


@dataclass(frozen=True)
class Market:
    """One Binance market K2 takes trades from. Each has its own exchange code, so trade ids, which both
    markets number on their own, never meet: not in message ids, sequence tracking, partitions or bars."""

    name: str  # as `--market` spells it
    exchange: str  # K2's exchange code
    ws_url: str  # the production stream's base URL
    rest_prefix: str  # REST paths: /api/v3/klines, /fapi/v1/klines
    klines_max_limit: int
    dump_path: str  # the path component of data.binance.vision dumps: data/spot/..., data/futures/um/...
    topic: str  # K2's Kafka topic; dead letters go to topic + ".dlq"
    classified: bool  # trade events carry X (the trade class)

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + ".dlq"


SPOT = Market("spot", "BINANCE", "wss://stream.binance.com:9443", "/api/v3", 1000, "spot", "market.crypto.trades.binance", False)
UM = Market(
    "um", "BINANCE_UM", "wss://fstream.binance.com", "/fapi/v1", 1500, "futures/um", "market.crypto.trades.binance_um", True
)
MARKETS = {m.name: m for m in (SPOT, UM)}
BY_EXCHANGE = {m.exchange: m for m in MARKETS.values()}  # K2's exchange code -> its Binance market


def market_of_dump(rel: str) -> Market:
    """The market of a dump from its place under the history folder: .../futures/um/... is USD-M futures."""
    return UM if f"/{UM.dump_path}/" in f"/{rel}" else SPOT


def quote_currency(symbol: str) -> str | None:
    """The quote asset a symbol ends with (BTCUSDT -> USDT), or None."""
    for asset in QUOTE_ASSETS:
        if symbol.endswith(asset) and len(symbol) > len(asset):
            return asset
    return None

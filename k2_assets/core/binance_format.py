"""What Binance's formats share, in one place: quote assets at the end of a symbol, and ms versus µs times."""

from __future__ import annotations

QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "DAI", "BTC", "ETH", "BNB", "EUR", "GBP", "TRY", "BRL", "JPY")
MICROS_FROM = 10**14  # epoch ms stay below this until year 5138; epoch µs are above it since 1973


def quote_currency(symbol: str) -> str | None:
    """The quote asset a symbol ends with (BTCUSDT -> USDT), or None."""
    for asset in QUOTE_ASSETS:
        if symbol.endswith(asset) and len(symbol) > len(asset):
            return asset
    return None

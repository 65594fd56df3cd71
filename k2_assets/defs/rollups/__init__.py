"""OHLCV rollups (1m, 5m, 1h, 1d) of market.trades, with time travel and declarative automation."""

"""Binance crypto trades: the live stream through Kafka, and the public history dumps."""

"""`k2 stream binance`: the live producer, an exchange's trade stream into Kafka."""

from __future__ import annotations

import click

from k2_assets.cli.common import UserError, default, market_option, settings, topic_option


@click.group("stream", no_args_is_help=False)
def stream() -> None:
    """Live producers: an exchange's trades into Kafka."""


@stream.command("binance")
@click.option("--symbols", required=True, help="comma-separated, e.g. BTCUSDT,ETHUSDT,BNBUSDT")
@market_option("spot, or um: USD-M futures (exchange BINANCE_UM, topic market.crypto.trades.binance_um)")
@click.option("--url", help="stream base URL  [default: K2_BINANCE_WS_URL, with --market um K2_BINANCE_UM_WS_URL]")
@click.option("--bootstrap", default=default("kafka_bootstrap"), help="Kafka bootstrap servers  [default: K2_KAFKA_BOOTSTRAP]")
@topic_option()
@click.option(
    "--partitions", type=click.IntRange(min=1), default=3, show_default=True, help="partitions of the topic if K2 creates it"
)
@click.option(
    "--linger-ms",
    type=click.IntRange(0, 60_000),
    default=default("producer_linger_ms"),
    help="gather each partition's trades this long into one batch  [default: K2_PRODUCER_LINGER_MS]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=default("producer_metrics_port"),
    help="serve Prometheus /metrics on PORT (0: off)  [default: K2_PRODUCER_METRICS_PORT]",
)
def binance(
    symbols: str,
    market: str,
    url: str | None,
    bootstrap: str,
    topic: str | None,
    partitions: int,
    linger_ms: int,
    metrics_port: int,
) -> None:
    """Binance's trade stream (spot or USD-M futures) into Kafka.

    Trades keyed by symbol, dead letters for what cannot be decoded, until Ctrl-C or SIGTERM (flushing first).
    """
    import asyncio
    import sys

    from k2_assets.core.binance_format import MARKETS
    from k2_assets.core.binance_stream import LOGGER, BinanceProducer
    from k2_assets.core.kafka import ensure_topics
    from k2_assets.core.logs import configure_json, get_logger
    from k2_assets.core.metrics import serve
    from k2_assets.core.stopping import Stopper

    names = [s.strip() for s in symbols.split(",") if s.strip()]
    if not names:
        raise UserError("--symbols needs at least one symbol, e.g. BTCUSDT")
    chosen = MARKETS[market]
    config = settings()
    url = url or (config.binance_um_ws_url if market == "um" else config.binance_ws_url)
    configure_json(sys.stderr)
    topic = topic or chosen.topic
    ensure_topics(bootstrap, {topic: partitions, topic + ".dlq": 1})
    producer = BinanceProducer(
        names, bootstrap, market=chosen, base_url=url, topic=topic, dead_letter_topic=topic + ".dlq", linger_ms=linger_ms
    )
    if metrics_port:
        serve(producer.metrics.registry, metrics_port)
        get_logger(LOGGER).info("metrics", url=f"http://127.0.0.1:{metrics_port}/metrics")

    async def run() -> None:
        Stopper(
            "k2 stream binance", f"the stream of {symbols} (flushing what Kafka has not acknowledged)", producer.stop
        ).install(asyncio.get_running_loop())
        await producer.run()

    asyncio.run(run())

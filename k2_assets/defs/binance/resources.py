from pathlib import Path

import dagster as dg

from k2_assets.core.binance_format import SPOT, UM, Market


class BinanceHistoryResource(dg.ConfigurableResource):
    """Directory of Binance's public trade dumps (SYMBOL-trades-YYYY-MM-DD.csv/.zip, SYMBOL-aggTrades-...)."""

    history_dir: str

    def path(self) -> Path:
        path = Path(self.history_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"Binance history directory {path} does not exist (set K2_BINANCE_HISTORY_DIR)")
        return path


class KafkaResource(dg.ConfigurableResource):
    """The Kafka cluster the live trades arrive on (the embedded broker by default)."""

    bootstrap: str
    topic: str = SPOT.topic
    um_topic: str = UM.topic  # USD-M futures
    session_timeout_ms: int = 6000  # how long a dead writer keeps its partitions (K2_KAFKA_SESSION_TIMEOUT_MS)
    # The sensor's writer reconciles gaps, and asks for a gap check run, once per cycle (K2_SENSOR_DRAIN_SECONDS).
    drain_seconds: int = 20
    batch_ms: int = 1000  # a micro-batch is committed once it is this old (K2_WRITER_BATCH_MS): it bounds freshness

    def topic_of(self, market: Market) -> str:
        return {SPOT: self.topic, UM: self.um_topic}[market]


class BinanceRestResource(dg.ConfigurableResource):
    """Binance's REST API (gap repair by trade id, klines); the local feed server serves it in the demo."""

    base_url: str
    um_base_url: str = "https://fapi.binance.com"  # USD-M futures (K2_BINANCE_UM_REST_URL)
    api_key: str = ""  # from K2_BINANCE_API_KEY: the real historicalTrades endpoint wants one

    def url(self, market: Market) -> str:
        return {SPOT: self.base_url, UM: self.um_base_url}[market]


defs = dg.Definitions(
    resources={
        "binance_history": BinanceHistoryResource(history_dir=dg.EnvVar("K2_BINANCE_HISTORY_DIR")),
        "kafka": KafkaResource(
            bootstrap=dg.EnvVar("K2_KAFKA_BOOTSTRAP"),
            session_timeout_ms=dg.EnvVar.int("K2_KAFKA_SESSION_TIMEOUT_MS"),
            drain_seconds=dg.EnvVar.int("K2_SENSOR_DRAIN_SECONDS"),
            batch_ms=dg.EnvVar.int("K2_WRITER_BATCH_MS"),
        ),
        "binance_rest": BinanceRestResource(
            base_url=dg.EnvVar("K2_BINANCE_REST_URL"),
            um_base_url=dg.EnvVar("K2_BINANCE_UM_REST_URL"),
            api_key=dg.EnvVar("K2_BINANCE_API_KEY"),
        ),
    }
)

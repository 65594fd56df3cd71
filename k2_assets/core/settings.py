"""K2's one configuration: every setting, its environment variable and its embedded default for one machine.

The CLI takes its option defaults from `Settings.from_env()`; the Dagster resources read the same variables
through `dg.EnvVar`, after `apply_defaults` has filled the unset ones in the code location's process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _setting(env: str, default: str, help: str):
    return field(metadata={"env": env, "default": default, "help": help})


@dataclass(frozen=True)
class Settings:
    home: Path = _setting("K2_HOME", "./.k2", "K2's own files: catalog, warehouse, demo data, logs, Dagster home")
    catalog_uri: str = _setting("K2_CATALOG_URI", "sqlite:///{K2_HOME}/catalog.db", "Iceberg SQL catalog (SQLite or PostgreSQL)")
    warehouse: str = _setting("K2_WAREHOUSE", "file://{K2_HOME}/warehouse", "Iceberg warehouse (file:// or s3://)")
    asx_data_dir: Path = _setting("K2_ASX_DATA_DIR", "{K2_HOME}/data/asx", "the ASX vendor's CSV files")
    binance_history_dir: Path = _setting("K2_BINANCE_HISTORY_DIR", "{K2_HOME}/data/binance", "Binance's public dumps")
    kafka_bootstrap: str = _setting("K2_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers")
    kafka_session_timeout_ms: int = _setting("K2_KAFKA_SESSION_TIMEOUT_MS", "6000", "the writer's consumer-group session timeout")
    producer_linger_ms: int = _setting(
        "K2_PRODUCER_LINGER_MS",
        "250",
        "the live producer gathers each partition's trades this long into one batch, in ms (the embedded broker's "
        "fetches cost more with every batch it holds)",
    )
    sensor_drain_seconds: int = _setting(
        "K2_SENSOR_DRAIN_SECONDS",
        "20",
        "the live writer reconciles gaps and asks for a gap check this often (whole seconds)",
    )
    writer_batch_ms: int = _setting(
        "K2_WRITER_BATCH_MS", "1000", "a live micro-batch is committed once it is this old, in ms (or at 250,000 rows)"
    )
    binance_ws_url: str = _setting("K2_BINANCE_WS_URL", "wss://stream.binance.com:9443", "Binance's WebSocket stream base URL")
    binance_um_ws_url: str = _setting(
        "K2_BINANCE_UM_WS_URL", "wss://fstream.binance.com", "Binance USD-M futures' WebSocket stream base URL"
    )
    binance_rest_url: str = _setting(
        "K2_BINANCE_REST_URL", "https://api.binance.com", "Binance's REST base URL (gap repair, klines)"
    )
    binance_um_rest_url: str = _setting(
        "K2_BINANCE_UM_REST_URL", "https://fapi.binance.com", "Binance USD-M futures' REST base URL (gap repair, klines)"
    )
    binance_api_key: str = _setting("K2_BINANCE_API_KEY", "", "Binance API key for historicalTrades (secret: environment only)")
    broker_port: int = _setting("K2_BROKER_PORT", "0", "the embedded broker's port (0: a free one)")
    metrics_host: str = _setting("K2_METRICS_HOST", "127.0.0.1", "address the /metrics endpoints bind to")
    writer_metrics_port: int = _setting("K2_WRITER_METRICS_PORT", "0", "the writer's /metrics port (0: none)")
    producer_metrics_port: int = _setting("K2_PRODUCER_METRICS_PORT", "0", "the producer's /metrics port (0: none)")
    backup_dir: Path = _setting("K2_BACKUP_DIR", "{K2_HOME}/backups", "where the nightly catalog backups go")
    pushgateway_url: str = _setting("K2_PUSHGATEWAY_URL", "", "Prometheus Pushgateway for run metrics (empty: none)")

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ | None = None) -> Settings:
        values = dict(os.environ if env is None else env)
        apply_defaults(values)
        typed = {}
        for f in fields(cls):
            kind = {"Path": Path, "int": int, "float": float}.get(str(f.type), str)
            raw = values[f.metadata["env"]]
            try:
                typed[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**typed)


DEFAULTS = {f.metadata["env"]: f.metadata["default"] for f in fields(Settings)}


def apply_defaults(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Fill unset K2_* variables with the embedded defaults (K2_HOME made absolute first)."""
    home = Path(env.get("K2_HOME") or DEFAULTS["K2_HOME"]).expanduser().resolve()
    env["K2_HOME"] = str(home)
    for name, template in DEFAULTS.items():
        if not env.get(name):
            env[name] = template.format(K2_HOME=home)


def describe() -> str:
    """Every setting with its variable and default (for `k2 --help`)."""
    return "\n".join(
        f"{f.metadata['env']} (default {f.metadata['default'] or 'empty'}): {f.metadata['help']}" for f in fields(Settings)
    )

"""K2 configuration from the environment, with embedded defaults for one machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULTS = {
    "K2_HOME": "./.k2",
    "K2_CATALOG_URI": "sqlite:///{K2_HOME}/catalog.db",
    "K2_WAREHOUSE": "file://{K2_HOME}/warehouse",
    "K2_ASX_DATA_DIR": "{K2_HOME}/data/asx",
    "K2_BINANCE_HISTORY_DIR": "{K2_HOME}/data/binance",
    "K2_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "K2_BINANCE_REST_URL": "https://api.binance.com",
}


def apply_defaults(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Fill unset K2_* variables with the embedded defaults (K2_HOME made absolute first)."""
    home = Path(env.get("K2_HOME") or DEFAULTS["K2_HOME"]).expanduser().resolve()
    env["K2_HOME"] = str(home)
    for name, template in DEFAULTS.items():
        if not env.get(name):
            env[name] = template.format(K2_HOME=home)


@dataclass(frozen=True)
class Settings:
    home: Path
    catalog_uri: str
    warehouse: str
    asx_data_dir: Path
    binance_history_dir: Path
    kafka_bootstrap: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        values = dict(os.environ if env is None else env)
        apply_defaults(values)
        return cls(
            home=Path(values["K2_HOME"]),
            catalog_uri=values["K2_CATALOG_URI"],
            warehouse=values["K2_WAREHOUSE"],
            asx_data_dir=Path(values["K2_ASX_DATA_DIR"]),
            binance_history_dir=Path(values["K2_BINANCE_HISTORY_DIR"]),
            kafka_bootstrap=values["K2_KAFKA_BOOTSTRAP"],
        )

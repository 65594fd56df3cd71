"""Structured logs of the long-running commands (producer, writer): one JSON object per event, through structlog.

Inside Dagster the same events go through the standard `logging` module, which `dagster.yaml`'s `python_logs`
routes into the run's and the sensor's logs.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_json(stream=None) -> None:
    """Events as JSON lines on `stream` (stderr by default), with an ISO timestamp and the level: for a command's own process."""
    global _configured
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str, sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str):
    """A structlog logger: JSON lines once `configure_json` ran (a command), else through `logging` (a library, Dagster)."""
    if not _configured:
        return structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
            wrapper_class=structlog.stdlib.BoundLogger,
        )
    return structlog.get_logger(name)

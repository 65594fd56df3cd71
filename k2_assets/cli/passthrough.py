"""Commands that still own their argument parsing (until each moves to click)."""

from __future__ import annotations

import click


def _passthrough(name: str, help: str, target):
    @click.command(name, help=help, add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx: click.Context) -> int:
        return target()(ctx.args)

    return command


def _stream():
    from k2_assets.core import binance_stream

    def run(argv):
        if not argv or argv[0] != "binance":
            raise click.UsageError("usage: k2 stream binance --symbols BTCUSDT,ETHUSDT")
        return binance_stream.main(argv[1:])

    return run


COMMANDS = [
    _passthrough("stream", "live producers: `k2 stream binance --symbols BTCUSDT,ETHUSDT`", _stream),
    _passthrough("feed", "local Binance-format feed server", lambda: __import__("k2_assets.core.feed_server", fromlist=["main"]).main),
    _passthrough("broker", "the embedded Kafka-compatible broker", lambda: __import__("k2_assets.core.kafka", fromlist=["main"]).main),
    _passthrough("writer", "drain Kafka into market.trades outside Dagster", lambda: __import__("k2_assets.core.live_writer", fromlist=["main"]).main),
    _passthrough("query", "DuckDB queries over the Iceberg tables", lambda: __import__("k2_assets.core.query", fromlist=["main"]).main),
]

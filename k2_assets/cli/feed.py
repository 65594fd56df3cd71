"""`k2 feed`: the local Binance-format feed server, for demos and tests without internet."""

from __future__ import annotations

from pathlib import Path

import click

from k2_assets.cli.common import UserError, market_option

RATIO = click.FloatRange(0.0, 1.0)
POSITIVE = click.FloatRange(0.0, min_open=True)


@click.command("feed")
@click.option(
    "--replay",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="serve this data.binance.vision trades dump (.csv/.zip); repeat to merge several (this or --random-walk)",
)
@click.option(
    "--random-walk",
    "random_walk_symbols",
    metavar="SYMBOLS",
    help="serve endless random-walk trades of these comma-separated symbols, e.g. BTCUSDT,ETHUSDT (this or --replay)",
)
@click.option("--symbol", help="symbol of a --replay file whose name does not start with it  [default: from the file name]")
@market_option("spot (stream.binance.com's formats, REST /api/v3) or um: USD-M futures (fstream's, REST /fapi/v1)")
@click.option(
    "--non-market-ratio",
    type=RATIO,
    default=0.0,
    show_default=True,
    help="with --market um: share of trades that are INSURANCE_FUND (2% off the market) or ADL trades",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=9443, show_default=True, help="port to listen on (0: a free one)")
@click.option("--rate", type=POSITIVE, help="messages per second per connection  [default: none: paced by --speedup]")
@click.option("--speedup", type=POSITIVE, help="replay at N times the original pace  [default: 1, real time]")
@click.option("--unpaced", is_flag=True, help="send as fast as the client reads  [default: off]")
@click.option(
    "--no-shared-cursor",
    is_flag=True,
    help="every connection replays from the start, not from where the market is  [default: off]",
)
@click.option("--ping-interval", type=float, default=20.0, show_default=True, help="seconds between the server's pings")
@click.option("--ping-timeout", type=float, default=60.0, show_default=True, help="seconds to wait for a pong before closing")
@click.option(
    "--drop-every",
    type=click.IntRange(min=1),
    metavar="N",
    help="end the TCP connection without a close frame every N frames  [default: never]",
)
@click.option("--max-connection-seconds", type=POSITIVE, help="close each connection with 1001 after this long  [default: never]")
@click.option("--skip-ids", default="", help="comma-separated trade ids never to stream (still served by REST)  [default: none]")
@click.option("--skip-ids-ratio", type=RATIO, default=0.0, show_default=True, help="share of trades never streamed")
@click.option("--duplicate-ratio", type=RATIO, default=0.0, show_default=True, help="share of trades sent twice")
@click.option("--out-of-order-ratio", type=RATIO, default=0.0, show_default=True, help="share of trades sent after the next one")
@click.option("--malformed-ratio", type=RATIO, default=0.0, show_default=True, help="share of trades sent as a truncated frame")
@click.option("--seed", default=0, show_default=True, help="random seed of the walk and of the faults")
def feed(
    replay: tuple[Path, ...],
    random_walk_symbols: str | None,
    symbol: str | None,
    market: str,
    non_market_ratio: float,
    host: str,
    port: int,
    rate: float | None,
    speedup: float | None,
    unpaced: bool,
    no_shared_cursor: bool,
    ping_interval: float,
    ping_timeout: float,
    drop_every: int | None,
    max_connection_seconds: float | None,
    skip_ids: str,
    skip_ids_ratio: float,
    duplicate_ratio: float,
    out_of_order_ratio: float,
    malformed_ratio: float,
    seed: int,
) -> None:
    """A local Binance-format feed server.

    Serves trades in the wire format (WebSocket and REST, klines included) of Binance's spot market or, with
    --market um, of its USD-M futures, until Ctrl-C or SIGTERM, with the faults a real feed has on request.
    """
    import asyncio
    import gc
    import logging

    from k2_assets.core.stopping import Stopper
    from k2_assets.dev import feed_server

    if bool(replay) == bool(random_walk_symbols):
        raise UserError("give either --replay FILE or --random-walk SYMBOLS")
    if sum((rate is not None, speedup is not None, unpaced)) > 1:
        raise UserError("pace by one of --rate, --speedup and --unpaced")
    try:
        skipped = {int(i) for i in skip_ids.split(",") if i.strip()}
    except ValueError:
        raise UserError(f"--skip-ids takes comma-separated trade ids, not {skip_ids!r}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is ours

    if replay:
        source = feed_server.merge_by_time(*(feed_server.replay_file(path, symbol) for path in replay))
        symbols = None
    else:
        symbols = [s.strip().upper() for s in random_walk_symbols.split(",") if s.strip()]
        source = feed_server.random_walk(symbols, seed=seed)
    try:
        server = feed_server.FeedServer(
            source,
            host=host,
            port=port,
            rate=rate,
            speedup=None if unpaced or rate else speedup or 1.0,
            shared_cursor=not no_shared_cursor,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            drop_every=drop_every,
            max_connection_seconds=max_connection_seconds,
            skip_ids=skipped,
            skip_ids_ratio=skip_ids_ratio,
            duplicate_ratio=duplicate_ratio,
            out_of_order_ratio=out_of_order_ratio,
            malformed_ratio=malformed_ratio,
            seed=seed,
            symbols=symbols,
            market=market,
            non_market_ratio=non_market_ratio,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    log = feed_server.log

    async def serve_until_signalled() -> None:
        await server.start()
        # Every full GC pass rescans all start-up objects, which costs more than the trades themselves at
        # 100k msg/s; freezing moves them out of the collector's way.
        gc.freeze()
        stopping = asyncio.Event()
        Stopper("k2 feed", f"the local Binance feed on {server.ws_url} and its connections", stopping.set).install(
            asyncio.get_running_loop()
        )
        log.info(
            "serving %s (%s streams: /ws/<symbol>@trade, /stream?streams=...; REST: %s%s/...) symbols %s",
            server.ws_url,
            market,
            server.http_url,
            server.market.rest_prefix,
            ",".join(sorted(server.symbols)),
        )
        await stopping.wait()
        await server.stop()
        log.info("stopped; stats %s", server.stats)

    asyncio.run(serve_until_signalled())

"""`k2 broker`: the embedded Kafka-compatible broker, for one machine."""

from __future__ import annotations

import click

from k2_assets.cli.common import default


@click.command("broker")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=default("broker_port"),
    help="loopback port to listen on (0: a free one)  [default: K2_BROKER_PORT, else 0]",
)
def broker(port: int) -> int:
    """The embedded Kafka-compatible broker.

    Tansu, on 127.0.0.1, its topics in memory, until Ctrl-C or SIGTERM.
    """
    import threading

    from k2_assets.core.stopping import Stopper
    from k2_assets.dev.broker import EmbeddedBroker

    running = EmbeddedBroker(port=port)
    stopping = threading.Event()
    with running:
        Stopper(
            "k2 broker", f"the embedded broker on {running.bootstrap} (its topics are in memory and go with it)", stopping.set
        ).install()
        print(f"k2: embedded Kafka-compatible broker on {running.bootstrap}", flush=True)
        while not stopping.is_set() and running.process.poll() is None:
            stopping.wait(0.2)
    return 0 if stopping.is_set() else running.process.returncode

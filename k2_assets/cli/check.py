"""`k2 check list|run`: K2's asset checks from the command line, one or many, on any stored partition."""

from __future__ import annotations

import click

from k2_assets.cli.common import UserError, dagster_instance, progress


@click.group("check")
def check() -> None:
    """List K2's asset checks, or run some of them alone on stored partitions (as the UI's "Execute" does)."""


@check.command("list")
@click.argument("asset", required=False)
def list_checks(asset: str | None) -> None:
    """Every asset check (of ASSET, if given), with its description."""
    for key, description in sorted(_checks(asset).items()):
        click.echo(f"{key.asset_key.to_user_string()}:{key.name}  {description}")


@check.command("run")
@click.argument("asset")
@click.argument("names", nargs=-1)
@click.option(
    "--partition",
    "partitions",
    multiple=True,
    help="partition key (a session date); repeat for several; none for an unpartitioned check such as freshness_check",
)
def run(asset: str, names: tuple[str, ...], partitions: tuple[str, ...]) -> int:
    """Run ASSET's checks NAMES (all of its checks if none are named) on each --partition, at the stored snapshot."""
    from k2_assets.cli.common import run_selection

    known = _checks(asset)
    unknown = sorted(set(names) - {key.name for key in known})
    if unknown:
        raise UserError(f"{asset} has no check {', '.join(unknown)} (see `k2 check list {asset}`)")
    keys = sorted(
        (key for key in known if not names or key.name in names), key=lambda k: names.index(k.name) if k.name in names else k.name
    )
    failed = 0
    with dagster_instance() as instance:
        for partition in progress(partitions or (None,), f"{asset}: {len(keys)} checks"):
            result = run_selection(set(), set(keys), partition, instance)
            order = [key.name for key in keys]
            for evaluation in sorted(result.get_asset_check_evaluations(), key=lambda e: order.index(e.check_name)):
                verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
                click.echo(f"{partition or '-'} {asset}:{evaluation.check_name} {verdict}")
                failed += not evaluation.passed
            if not result.success:
                click.echo(f"{partition}: run {result.run_id} failed (see its log in the UI)", err=True)
    return 1 if failed else 0


def _checks(asset: str | None) -> dict:
    from k2_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    checks = {key: graph.get_check_spec(key).description or "" for key in graph.asset_check_keys}
    if asset is None:
        return checks
    mine = {key: d for key, d in checks.items() if key.asset_key.to_user_string() == asset}
    if not mine:
        assets = sorted({key.asset_key.to_user_string() for key in checks})
        raise UserError(f"no asset {asset!r} with checks; one of: {', '.join(assets)}")
    return mine

"""`k2 backfill`: materialize assets over a range of partitions from the command line, with their checks."""

from __future__ import annotations

from datetime import date

import click

from k2_assets.cli.common import DATE, UserError, dagster_instance, date_range, progress


@click.command("backfill")
@click.argument("assets", nargs=-1, required=True)
@click.option("--start", required=True, type=DATE, help="first partition")
@click.option("--end", required=True, type=DATE, help="last partition, inclusive")
def backfill(assets: tuple[str, ...], start: date, end: date) -> int:
    """Materialize ASSETS (e.g. asx_trades asx_quotes) and their checks on every partition from --start to --end.

    Each partition is one run, recorded in the Dagster instance the UI shows; a failed partition is reported and
    the others still run.
    """
    from k2_assets.cli.common import run_selection
    from k2_assets.definitions import defs

    date_range(start, end)
    graph = defs.resolve_asset_graph()
    known = {key.to_user_string(): key for key in graph.materializable_asset_keys}
    unknown = sorted(set(assets) - set(known))
    if unknown:
        raise UserError(f"unknown asset {', '.join(unknown)}; one of: {', '.join(sorted(known))}")
    partitions = {graph.get(known[a]).partitions_def for a in assets}
    if len(partitions) != 1 or None in partitions:
        raise UserError("the assets of one backfill must share one partitioning (e.g. asx_trades asx_quotes)")
    keys = [k for k in partitions.pop().get_partition_keys() if start.isoformat() <= k <= end.isoformat()]
    if not keys:
        raise UserError(f"no partition of {', '.join(assets)} between {start} and {end}")
    selected = {known[a] for a in assets}
    failed = []
    with dagster_instance() as instance:
        for key in progress(keys, f"{' '.join(assets)} {start}..{end}"):
            result = run_selection(selected, {c for c in graph.asset_check_keys if c.asset_key in selected}, key, instance)
            if not result.success:
                failed.append(key)
    ok = len(keys) - len(failed)
    click.echo(
        f"k2: {ok} of {len(keys)} partitions materialized" + (f"; failed: {', '.join(failed)}" if failed else ""), err=True
    )
    return 1 if failed else 0

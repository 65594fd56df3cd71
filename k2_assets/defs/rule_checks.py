"""The rule catalogue as first-class Dagster asset checks: one check per rule, named after it.

Each check reads the stored partition at the snapshot of its latest materialization, so any check can run alone,
from the UI or `k2 check run`, on any partition. A materialization selects its asset's checks too (Dagster adds
them to the run); blocking rules block what is downstream.
"""

import time
import warnings
from dataclasses import dataclass
from datetime import date

import dagster as dg
import pyarrow as pa
from pyiceberg.expressions import And, EqualTo

from k2_assets.core import checks, integrity, ledger
from k2_assets.core.outage import StoreHealth
from k2_assets.core.writer import partition_filter
from k2_assets.defs.resources import IcebergResource

OUTAGE_WAIT_SECONDS = 120.0

# A partitioned asset check is a preview feature of Dagster 1.13; it is what records one evaluation per partition,
# so the warning it raises on every import says nothing new.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


def rules(kind: str, files: bool = False, without: tuple[str, ...] = ()) -> tuple[checks.Rule, ...]:
    """The row rules (pandera), for trades the integrity rules (gaps, time order), and for file loads the ledger's."""
    every = checks.rules(kind) + (integrity.RULES if kind == "trades" else ()) + (ledger.RULES if files else ())
    return tuple(rule for rule in every if rule.name not in without)


@dataclass(frozen=True)
class Materialization:
    """What a partition's latest materialization says: the snapshots it wrote and its run."""

    snapshot_id: int | None
    rejected_snapshot_id: int | None
    run_id: str | None


def latest_materialization(instance: dg.DagsterInstance, asset: dg.AssetKey, partition: str) -> Materialization:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return Materialization(None, None, None)
    metadata = records[0].asset_materialization.metadata

    def snapshot(key: str) -> int | None:
        value = metadata.get(key)
        text = str(getattr(value, "value", value) or "")
        return int(text) if text.isdigit() else None

    return Materialization(snapshot("snapshot_id"), snapshot("rejected_snapshot_id"), records[0].run_id)


def rule_checks(
    asset: str,
    kind: str,
    exchange: str,
    partitions_def: dg.PartitionsDefinition,
    *,
    files: bool = False,
    without: tuple[str, ...] = (),
) -> list[dg.AssetChecksDefinition]:
    """One asset check per rule of `kind` on `asset` (its partitions are `exchange`'s session dates in market.<kind>).

    Each check is an op of its own, so one can run alone (a job's op selection in the UI, `k2 check run`); the
    checks of one run share one read and one validation of the partition.
    """
    key = dg.AssetKey(asset)
    every = rules(kind, files, without)

    def evaluated(context: dg.AssetCheckExecutionContext, iceberg: IcebergResource) -> _Evaluation:
        cache_key = (context.run.run_id, asset, context.partition_key)
        if cache_key not in _evaluations:
            _evaluations.clear()  # one partition of one run at a time: nothing older is asked for again
            done = latest_materialization(context.instance, key, context.partition_key)
            day = date.fromisoformat(context.partition_key)
            # A catalog outage delays the checks instead of failing their run.
            stored, snapshot, outcomes = StoreHealth(logger=context.log).call(
                lambda: evaluate(iceberg, kind, exchange, day, asset, done, [rule.name for rule in every]),
                f"reading the {context.partition_key} partition of market.{kind}",
                deadline=time.monotonic() + OUTAGE_WAIT_SECONDS,
            )
            _evaluations[cache_key] = _Evaluation(stored.num_rows, snapshot, done.run_id, outcomes)
        return _evaluations[cache_key]

    def check_for(rule: checks.Rule) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=key, name=rule.name, description=rule.description, blocking=rule.blocking, partitions_def=partitions_def
        )
        def _check(context: dg.AssetCheckExecutionContext, iceberg: IcebergResource) -> dg.AssetCheckResult:
            evaluation = evaluated(context, iceberg)
            outcome = evaluation.outcomes[rule.name]
            return dg.AssetCheckResult(
                passed=outcome.passed,
                severity=dg.AssetCheckSeverity.ERROR if rule.blocking else dg.AssetCheckSeverity.WARN,
                metadata={
                    "failed_rows": outcome.failed,
                    "checked_rows": evaluation.checked_rows,
                    "sample": dg.MetadataValue.json(outcome.sample),
                    "snapshot_id": str(evaluation.snapshot_id),
                    "materialization_run_id": evaluation.run_id or "",
                },
            )

        return _check

    return [check_for(rule) for rule in every]


@dataclass(frozen=True)
class _Evaluation:
    checked_rows: int
    snapshot_id: int | None
    run_id: str | None
    outcomes: dict[str, checks.Outcome]


_evaluations: dict[tuple[str, str, str], _Evaluation] = {}


def evaluate(
    iceberg: IcebergResource, kind: str, exchange: str, day: date, source: str, done: Materialization, selected: list[str]
) -> tuple[pa.Table, int | None, dict[str, checks.Outcome]]:
    """The selected rules on the partition as stored at `done`'s snapshot (the current one if it recorded none)."""
    table = iceberg.table(kind)
    snapshot = done.snapshot_id or table.metadata.current_snapshot_id
    stored = (
        table.scan(row_filter=partition_filter(exchange, day), snapshot_id=snapshot).to_arrow()
        if snapshot is not None
        else table.schema().as_arrow().empty_table()
    )
    outcomes = (
        checks.validate(checks.to_frame(stored), kind, exchange, day)
        if stored.num_rows
        else {rule.name: checks.Outcome(rule) for rule in checks.rules(kind)}
    )
    wanted = set(selected)
    if integrity.NO_UNEXPLAINED_GAPS.name in wanted:
        gaps = iceberg.table("sequence_gaps")
        rows = gaps.scan(row_filter=integrity.gaps_of_day(exchange, day)).to_arrow()
        outcomes[integrity.NO_UNEXPLAINED_GAPS.name] = integrity.gap_outcome(rows)
    if integrity.TIME_MONOTONIC.name in wanted:
        outcomes[integrity.TIME_MONOTONIC.name] = (
            integrity.time_disorder(stored) if stored.num_rows else checks.Outcome(integrity.TIME_MONOTONIC)
        )
    if wanted & {rule.name for rule in ledger.RULES}:
        files = (
            iceberg.table("source_files")
            .scan(
                row_filter=And(
                    EqualTo("source", source), EqualTo("partition_date", day.isoformat()), EqualTo("run_id", done.run_id or "")
                )
            )
            .to_arrow()
        )
        rejected = (
            iceberg.table("rejected")
            .scan(
                row_filter=And(EqualTo("source", source), EqualTo("partition_date", day.isoformat())),
                snapshot_id=done.rejected_snapshot_id,
            )
            .to_arrow()
        )
        outcomes[ledger.FILES_READABLE.name] = ledger.readable_outcome(files)
        outcomes[ledger.LINES_ACCOUNTED.name] = (
            ledger.accounted_outcome(files, stored, rejected) if done.run_id else _never_loaded()
        )
    return stored, snapshot, outcomes


def _never_loaded() -> checks.Outcome:
    outcome = checks.Outcome(ledger.LINES_ACCOUNTED, failed=1)
    outcome.sample = [{"problems": ["the partition has no materialization, so no load to account for"]}]
    return outcome

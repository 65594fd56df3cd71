"""ASX history backfill over the real vendor sample (2014-03-10..14, trades and quotes).

Stages, each timed as best and median of N repetitions in this one process (imports excluded):
  1. parse + normalize: `asx.load_session` for 5 sessions x 2 kinds, decode cache cleared before
     each repetition; next to it the raw floor, `pyarrow.csv.read_csv` of the same files as strings.
  2. validate: `checks.validate(checks.to_frame(rows))` over the 10 decoded batches.
  3. full backfill into a fresh SQLite catalog + file warehouse, two ways:
       core - decode, replace rows, replace rejects, scan the partition back, validate (what
              `loading.write_partition` does, without Dagster);
       dagster - `dg.materialize([asx_trades, asx_quotes], partition_key=day)` per session.
  4. peak RSS of the process.
The sample lives beside the checkout at ../shared/data/asx_k2 (or $K2_SHARED_DATA/asx_k2); it is
read in place, never copied.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
from pyiceberg.expressions import And, EqualTo

from bench._common import REPO, BenchUnavailable, Timing, environment, footer, progress, row, save, timed
from k2_assets.core import asx, catalog, checks, writer

NAME = "asx_backfill"
SESSIONS = [date(2014, 3, 10) + timedelta(days=i) for i in range(5)]
KINDS = ("trades", "quotes")
STAGE_REPEAT = 9  # the floor alone spreads by a third between repetitions on this machine: medians of 9
BACKFILL_REPEAT = 3
TARGET_RAW_FRACTION = 0.4  # parse + normalize against read_csv as strings, same run
TARGET_BACKFILL_S = 10.0


def data_dir() -> Path:
    shared = Path(os.environ["K2_SHARED_DATA"]) if os.environ.get("K2_SHARED_DATA") else REPO.parent / "shared" / "data"
    path = shared / "asx_k2"
    if not (path / "reference-data" / "company_info.csv").is_file():
        how = "$K2_SHARED_DATA" if os.environ.get("K2_SHARED_DATA") else "the default ../shared/data beside the repo"
        raise BenchUnavailable(
            f"ASX sample not found at {path} (from {how}): check out ../shared beside the repo "
            "or set K2_SHARED_DATA to the shared `data` directory"
        )
    return path


# ---------------------------------------------------------------- 1. parse + normalize, raw floor


def decode_all(data: Path) -> list[tuple[date, str, object]]:
    """Cold-cache decode of every session and kind, as a backfill meets them."""
    asx._decode_file.cache_clear()
    return [(day, kind, asx.load_session(data, day, kind, source=f"asx_{kind}")) for day in SESSIONS for kind in KINDS]


def raw_read_all(data: Path) -> int:
    """Just reading the same files: headerless CSV, every column a string, no conversion."""
    rows = 0
    for kind, fields in (("trades", asx.TRADE_FIELDS), ("quotes", asx.QUOTE_FIELDS)):
        for path in asx.vendor_files(data, kind):
            table = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(column_names=list(fields)),
                parse_options=pcsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                convert_options=pcsv.ConvertOptions(column_types={f: pa.string() for f in fields}),
            )
            rows += table.num_rows
    return rows


def bench_parse(data: Path) -> tuple[Timing, Timing, list]:
    decode, floor = Timing(), Timing()
    # One untimed pass first: the first decode in a process also pays one-time costs (the time-zone
    # database, regex compilation, Arrow's kernel registry, the thread pool, the allocator growing).
    raw_read_all(data)
    decode_all(data)
    batches = []
    for _ in range(STAGE_REPEAT):
        # Interleaved so both see the same machine state (page cache, CPU clocks).
        seconds, floor.rows = timed(raw_read_all, data)
        floor.seconds.append(seconds)
        seconds, batches = timed(decode_all, data)
        decode.seconds.append(seconds)
        decode.rows = sum(batch.read for _, _, batch in batches)
    progress(
        f"parse+normalize: {decode.rows:,} rows, best {decode.best:.3f}s ({decode.rate(decode.best):,.0f} rows/s); "
        f"raw read_csv floor best {floor.best:.3f}s ({floor.rate(floor.best):,.0f} rows/s)"
    )
    return decode, floor, batches


# ---------------------------------------------------------------- 2. validate


def validate_all(batches) -> int:
    failures = 0
    for day, kind, batch in batches:
        outcomes = checks.validate(checks.to_frame(batch.rows), kind, asx.EXCHANGE, day)
        failures += sum(o.failed for o in outcomes.values())
    return failures


def bench_validate(batches) -> tuple[Timing, int]:
    timing = Timing(rows=sum(batch.rows.num_rows for _, _, batch in batches))
    failures = 0
    for _ in range(STAGE_REPEAT):
        seconds, failures = timed(validate_all, batches)
        timing.seconds.append(seconds)
    progress(
        f"validate: {timing.rows:,} rows, best {timing.best:.3f}s ({timing.rate(timing.best):,.0f} rows/s), "
        f"failed-row checks {failures}"
    )
    return timing, failures


# ---------------------------------------------------------------- 3. full backfill


def catalog_props(home: Path) -> dict[str, str]:
    return {"catalog_uri": f"sqlite:///{home}/catalog.db", "warehouse": f"file://{home}/warehouse"}


CORE_STEPS = ("decode", "write rows", "write rejected", "scan back", "validate")


def backfill_core(data: Path, home: Path) -> dict:
    """Per session and kind, the work of `loading.write_partition` minus Dagster's metadata."""
    asx._decode_file.cache_clear()
    props = catalog_props(home)
    cat = catalog.open_catalog(props["catalog_uri"], props["warehouse"])
    totals = {"read": 0, "written": 0, "rejected": 0, "stored": 0, "failed_checks": 0}
    steps = dict.fromkeys(CORE_STEPS, 0.0)
    for day in SESSIONS:
        for kind in KINDS:
            source = f"asx_{kind}"
            where = writer.partition_filter(asx.EXCHANGE, day)
            properties = {"k2.source": source, "k2.partition": day.isoformat(), "k2.run_id": "bench"}
            t0 = time.perf_counter()
            batch = asx.load_session(data, day, kind, source=source)
            t1 = time.perf_counter()
            result = writer.replace_rows(catalog.ensure_table(cat, kind), batch.rows, where, properties=properties)
            t2 = time.perf_counter()
            writer.replace_rows(
                catalog.ensure_table(cat, "rejected"),
                batch.rejected,
                And(EqualTo("source", source), EqualTo("partition_date", day.isoformat())),
                properties=properties,
            )
            t3 = time.perf_counter()
            stored = catalog.ensure_table(cat, kind).scan(row_filter=where, snapshot_id=result.snapshot_id).to_arrow()
            t4 = time.perf_counter()
            outcomes = checks.validate(checks.to_frame(stored), kind, asx.EXCHANGE, day)
            t5 = time.perf_counter()
            for step, seconds in zip(CORE_STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                steps[step] += seconds
            totals["read"] += batch.read
            totals["written"] += result.written
            totals["rejected"] += batch.rejected.num_rows
            totals["stored"] += stored.num_rows
            totals["failed_checks"] += sum(not o.passed for o in outcomes.values())
    totals["steps"] = steps
    return totals


QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def backfill_dagster(data: Path, home: Path) -> dict:
    """`dg.materialize` per session, resources built as in k2_assets/definitions.py but pointed here."""
    import dagster as dg

    from k2_assets.defs.asx.assets import asx_quotes, asx_trades
    from k2_assets.defs.asx.resources import AsxFilesResource
    from k2_assets.defs.resources import IcebergResource

    asx._decode_file.cache_clear()
    resources = {"iceberg": IcebergResource(**catalog_props(home)), "asx_files": AsxFilesResource(data_dir=str(data))}
    totals = {"read": 0, "written": 0, "rejected": 0, "stored": 0, "failed_checks": 0}
    with dg.DagsterInstance.ephemeral() as instance:
        for day in SESSIONS:
            result = dg.materialize(
                [asx_trades, asx_quotes],
                partition_key=day.isoformat(),
                resources=resources,
                instance=instance,
                run_config=QUIET_RUN_CONFIG,
            )
            if not result.success:
                raise RuntimeError(f"dg.materialize failed for {day}")
            for asset in ("asx_trades", "asx_quotes"):
                (event,) = result.asset_materializations_for_node(asset)
                meta = {k: v.value for k, v in event.metadata.items()}
                totals["read"] += meta["rows_read"]
                totals["written"] += meta["rows_written"]
                totals["rejected"] += meta["rows_rejected"]
                totals["stored"] += meta["dagster/row_count"]
            totals["failed_checks"] += sum(not e.passed for e in result.get_asset_check_evaluations())
    return totals


def table_counts(home: Path) -> dict[str, int]:
    props = catalog_props(home)
    cat = catalog.open_catalog(props["catalog_uri"], props["warehouse"])
    return {
        name: cat.load_table(f"market.{name}").scan(selected_fields=("source_row",)).to_arrow().num_rows
        for name in ("trades", "quotes", "rejected")
    }


def bench_backfill(data: Path, label: str, fn) -> tuple[Timing, dict]:
    timing = Timing()
    totals: dict = {}
    steps: dict[str, list[float]] = {}
    for i in range(BACKFILL_REPEAT):
        with tempfile.TemporaryDirectory(prefix=f"k2-bench-{label}-") as tmp:
            home = Path(tmp)
            seconds, totals = timed(fn, data, home)
            timing.seconds.append(seconds)
            # Outside the timing: what the tables hold must be exactly what was written.
            counts = table_counts(home)
        if totals["read"] != totals["written"] + totals["rejected"]:
            raise AssertionError(f"{label}: read {totals['read']} != written {totals['written']} + rejected {totals['rejected']}")
        if counts["trades"] + counts["quotes"] != totals["written"] or counts["rejected"] != totals["rejected"]:
            raise AssertionError(f"{label}: tables hold {counts}, but the loads wrote {totals}")
        totals["table_rows"] = counts
        for step, step_seconds in totals.pop("steps", {}).items():
            steps.setdefault(step, []).append(step_seconds)
        progress(f"backfill {label} {i + 1}/{BACKFILL_REPEAT}: {seconds:.2f}s")
    timing.rows = totals["read"]
    if steps:
        totals["steps_median_s"] = {step: statistics.median(v) for step, v in steps.items()}
    progress(
        f"backfill {label}: best {timing.best:.2f}s, median {timing.median:.2f}s ({timing.rate(timing.best):,.0f} rows/s best)"
    )
    return timing, totals


# ---------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(results: dict) -> str:
    s = results["stages"]
    rows = [
        (
            "parse+normalize (10 loads, cold cache)",
            s["parse_normalize"],
            f">= {TARGET_RAW_FRACTION:g}x the floor",
            results["verdicts"]["parse_normalize"],
        ),
        ("  raw floor: read_csv as strings", s["raw_read_csv"], "", ""),
        ("validate (10 batches, pandera)", s["validate"], "", ""),
        (
            "backfill 5 days, core",
            s["backfill_core"],
            f"< {TARGET_BACKFILL_S:g} s",
            verdict(s["backfill_core"]["median_s"] < TARGET_BACKFILL_S),
        ),
        (
            "backfill 5 days, dg.materialize",
            s["backfill_dagster"],
            f"< {TARGET_BACKFILL_S:g} s",
            verdict(s["backfill_dagster"]["median_s"] < TARGET_BACKFILL_S),
        ),
    ]
    header = (
        f"{'stage':<40} {'n':>2} {'best s':>8} {'median s':>9} {'rows/s best':>13} {'rows/s median':>14}  {'target':<22} verdict"
    )
    lines = [
        f"ASX backfill — {results['data_dir']}, sessions {SESSIONS[0]}..{SESSIONS[-1]}, trades + quotes"
        f" ({results['environment']['cpu_count']} CPUs, pyarrow {results['environment']['versions']['pyarrow']})",
        header,
        "-" * len(header),
    ]
    for label, t, target, ok in rows:
        lines.append(
            f"{label:<40} {t['repetitions']:>2} {t['best_s']:>8.3f} {t['median_s']:>9.3f} "
            f"{t['rows_per_s_best']:>13,.0f} {t['rows_per_s_median']:>14,.0f}  {target:<22} {ok}"
        )
    c = results["counts"]
    ratio = s["parse_normalize"]["best_s"] / s["raw_read_csv"]["best_s"]
    steps = results["backfill_core_steps_median_s"]
    lines += [
        "-" * len(header),
        "core backfill by step (median s over the 5 days x 2 kinds): "
        + ", ".join(f"{step} {seconds:.2f}" for step, seconds in steps.items())
        + f"; Dagster overhead ≈ {s['backfill_dagster']['median_s'] - s['backfill_core']['median_s']:.2f} s",
        f"rows read {c['read']:,} = written {c['written']:,} + rejected {c['rejected']:,}  "
        "(checked for both paths; tables hold the same)",
        f"decode vs raw read: {ratio:.1f}x the floor's time; validate failures: {c['validate_failed_rows']} rows; "
        f"failed checks after backfill: core {c['core_failed_checks']}, dagster {c['dagster_failed_checks']}",
        footer(results, "; verdicts use the median"),
    ]
    return "\n".join(lines)


def run() -> str:
    data = data_dir()
    load_before = os.getloadavg()[0]
    progress(f"ASX sample: {data} (load average {load_before:.2f} on {os.cpu_count()} CPUs)")
    decode, floor, batches = bench_parse(data)
    validate, failures = bench_validate(batches)
    del batches
    core, core_totals = bench_backfill(data, "core", backfill_core)
    dagster, dagster_totals = bench_backfill(data, "dagster", backfill_dagster)
    for key in ("read", "written", "rejected"):
        if core_totals[key] != dagster_totals[key]:
            raise AssertionError(f"core and dagster paths disagree on {key}: {core_totals[key]} vs {dagster_totals[key]}")
    if core_totals["read"] != decode.rows:
        raise AssertionError(f"backfill read {core_totals['read']} rows, the decode stage {decode.rows}")
    results = {
        "benchmark": NAME,
        "data_dir": os.path.relpath(data, REPO),
        "sessions": [d.isoformat() for d in SESSIONS],
        "kinds": list(KINDS),
        "environment": environment(),
        "targets": {
            "parse_normalize_fraction_of_read_csv": TARGET_RAW_FRACTION,
            "backfill_s": TARGET_BACKFILL_S,
            "judged_on": "median",
        },
        "stages": {
            "parse_normalize": decode.as_dict(),
            "raw_read_csv": floor.as_dict(),
            "validate": validate.as_dict(),
            "backfill_core": core.as_dict(),
            "backfill_dagster": dagster.as_dict(),
        },
        "verdicts": {
            "parse_normalize": verdict(decode.rate(decode.median) >= TARGET_RAW_FRACTION * floor.rate(floor.median)),
            "backfill_core": verdict(core.median < TARGET_BACKFILL_S),
            "backfill_dagster": verdict(dagster.median < TARGET_BACKFILL_S),
        },
        "counts": {
            "read": core_totals["read"],
            "written": core_totals["written"],
            "rejected": core_totals["rejected"],
            "table_rows": core_totals["table_rows"],
            "validate_failed_rows": failures,
            "core_failed_checks": core_totals["failed_checks"],
            "dagster_failed_checks": dagster_totals["failed_checks"],
        },
        "backfill_core_steps_median_s": core_totals.get("steps_median_s", {}),
        "summary": [
            row(
                "ASX parse + normalize",
                f"{decode.rate(decode.median) / 1e6:.2f} M rows/s",
                f"read_csv as strings: {floor.rate(floor.median) / 1e6:.2f} M/s",
                decode.rate(decode.median) / floor.rate(floor.median),
                f">= {TARGET_RAW_FRACTION:g}x",
                decode.rate(decode.median) >= TARGET_RAW_FRACTION * floor.rate(floor.median),
            ),
            row(
                "ASX backfill, 5 days (core)",
                f"{core.median:.2f} s",
                "",
                None,
                f"< {TARGET_BACKFILL_S:g} s",
                core.median < TARGET_BACKFILL_S,
            ),
        ],
    }
    return render(save(NAME, results, load_before))

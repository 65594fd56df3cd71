"""Compliance report of asset check results, read from Dagster's event log.

`k2 report checks --start 2014-03-10 --end 2014-03-14 --format html|csv|md [--out FILE]`

The range selects by partition (the exchange session date); an evaluation of an unpartitioned
check is placed by the date it ran. Each row: asset, partition, check, severity, passed, failed and
checked rows, a sample of failing rows, the Iceberg snapshot the check ran against, and the run.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone

import dagster as dg
from dagster import DagsterEventType, EventRecordsFilter

FIELDS = ("asset", "partition", "check", "severity", "passed", "failed_rows", "checked_rows", "snapshot_id", "run_id", "evaluated_at", "sample")


@dataclass(frozen=True)
class CheckRow:
    asset: str
    partition: str
    check: str
    severity: str
    passed: bool
    failed_rows: int | None
    checked_rows: int | None
    snapshot_id: str
    run_id: str
    evaluated_at: str
    sample: str  # JSON


def collect(instance: dg.DagsterInstance, start: date, end: date) -> list[CheckRow]:
    """Every asset check evaluation whose partition (or run date) lies in [start, end]."""
    if end < start:
        raise ValueError(f"the range is reversed: {start} > {end}")
    records = instance.get_event_records(EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION), ascending=True)
    run_partitions: dict[str, str | None] = {}
    rows = []
    for record in records:
        entry = record.event_log_entry
        evaluation = entry.dagster_event.event_specific_data
        partition = evaluation.partition
        if partition is None and entry.run_id:
            if entry.run_id not in run_partitions:
                run = instance.get_run_by_id(entry.run_id)
                run_partitions[entry.run_id] = run.tags.get("dagster/partition") if run else None
            partition = run_partitions[entry.run_id]
        when = datetime.fromtimestamp(entry.timestamp, tz=timezone.utc)
        day = _as_date(partition) or when.date()
        if not start <= day <= end:
            continue
        meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        rows.append(CheckRow(
            asset=evaluation.asset_key.to_user_string(),
            partition=partition or "",
            check=evaluation.check_name,
            severity=evaluation.severity.value,
            passed=evaluation.passed,
            failed_rows=meta.get("failed_rows"),
            checked_rows=meta.get("checked_rows"),
            snapshot_id=str(meta.get("snapshot_id", "")),
            run_id=entry.run_id or "",
            evaluated_at=when.isoformat(timespec="seconds"),
            sample=json.dumps(meta.get("sample", []), default=str),
        ))
    return sorted(rows, key=lambda r: (r.partition, r.asset, r.check, r.evaluated_at))


def _as_date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def summarize(rows: list[CheckRow]) -> list[dict]:
    """Per asset and check: evaluations, passed, failed, and the latest outcome."""
    groups: dict[tuple, list[CheckRow]] = defaultdict(list)
    for row in rows:
        groups[(row.asset, row.check, row.severity)].append(row)
    return [
        {"asset": asset, "check": check, "severity": severity, "evaluations": len(group),
         "passed": sum(r.passed for r in group), "failed": sum(not r.passed for r in group),
         "failing_partitions": ", ".join(sorted({r.partition for r in group if not r.passed}))}
        for (asset, check, severity), group in sorted(groups.items())
    ]


def to_csv(rows: list[CheckRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return out.getvalue()


def to_markdown(rows: list[CheckRow], start: date, end: date) -> str:
    summary = summarize(rows)
    lines = [f"# K2 asset check report, {start} to {end}", "",
             f"{len(rows)} evaluations, {sum(not r.passed for r in rows)} failed.", "", "## Summary", "",
             "| asset | check | severity | evaluations | passed | failed | failing partitions |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['asset']} | {s['check']} | {s['severity']} | {s['evaluations']} | {s['passed']} | {s['failed']} | {s['failing_partitions']} |"
              for s in summary]
    lines += ["", "## Details", "", "| partition | asset | check | severity | passed | failed rows | checked rows | snapshot | run | sample |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.partition} | {r.asset} | {r.check} | {r.severity} | {'yes' if r.passed else 'NO'} | {_n(r.failed_rows)} | "
              f"{_n(r.checked_rows)} | {r.snapshot_id} | {r.run_id[:8]} | {'' if r.passed else r.sample.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html(rows: list[CheckRow], start: date, end: date) -> str:
    """One self-contained page: summary first, then every evaluation (failures first)."""
    e = html.escape
    failed = sum(not r.passed for r in rows)
    summary_rows = "".join(
        f"<tr class='{'bad' if s['failed'] else 'ok'}'><td>{e(s['asset'])}</td><td>{e(s['check'])}</td><td>{e(s['severity'])}</td>"
        f"<td class=n>{s['evaluations']}</td><td class=n>{s['passed']}</td><td class=n>{s['failed']}</td><td>{e(s['failing_partitions'])}</td></tr>"
        for s in summarize(rows)
    )
    detail_rows = "".join(
        f"<tr class='{'ok' if r.passed else 'bad'}'><td>{e(r.partition)}</td><td>{e(r.asset)}</td><td>{e(r.check)}</td><td>{e(r.severity)}</td>"
        f"<td>{'passed' if r.passed else 'FAILED'}</td><td class=n>{_n(r.failed_rows)}</td><td class=n>{_n(r.checked_rows)}</td>"
        f"<td><code>{e(r.snapshot_id)}</code></td><td><code>{e(r.run_id[:8])}</code></td>"
        f"<td>{'' if r.passed else '<details><summary>sample</summary><pre>' + e(json.dumps(json.loads(r.sample), indent=1)) + '</pre></details>'}</td></tr>"
        for r in sorted(rows, key=lambda r: (r.passed, r.partition, r.asset, r.check))
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>K2 asset check report {start} to {end}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0;width:100%}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} th{{background:#f0f0f0}}
td.n{{text-align:right}} tr.bad td{{background:#fdecea}} tr.ok td{{background:#f3faf3}} pre{{margin:0;font-size:12px}}
.stat{{display:inline-block;margin-right:2em;font-size:18px}}
</style></head><body>
<h1>K2 asset check report</h1>
<p>Partitions {start} to {end}; generated {datetime.now(timezone.utc).isoformat(timespec="seconds")}.</p>
<p><span class=stat>{len(rows)} evaluations</span><span class=stat>{len(rows) - failed} passed</span><span class=stat>{failed} failed</span></p>
<h2>Summary</h2>
<table><tr><th>asset</th><th>check</th><th>severity</th><th>evaluations</th><th>passed</th><th>failed</th><th>failing partitions</th></tr>{summary_rows}</table>
<h2>Details</h2>
<table><tr><th>partition</th><th>asset</th><th>check</th><th>severity</th><th>result</th><th>failed rows</th><th>checked rows</th><th>Iceberg snapshot</th><th>run</th><th>failing sample</th></tr>{detail_rows}</table>
</body></html>
"""


def _n(value) -> str:
    return "" if value is None else str(value)


def render(rows: list[CheckRow], fmt: str, start: date, end: date) -> str:
    if fmt == "csv":
        return to_csv(rows)
    if fmt == "md":
        return to_markdown(rows, start, end)
    if fmt == "html":
        return to_html(rows, start, end)
    raise ValueError(f"format must be html, csv or md, not {fmt!r}")

"""The ledger's checks: every vendor file could be read, and every line of every file is accounted for."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core.checks import Outcome, Rule

FILES_READABLE = Rule(
    "source_files_readable", "every vendor file of the partition could be read (else it has one rejected record)", blocking=False
)
LINES_ACCOUNTED = Rule(
    "lines_accounted_for",
    "for every vendor file, lines read = written + rejected + duplicates, in the ledger and in the tables",
    blocking=True,
)
RULES = (FILES_READABLE, LINES_ACCOUNTED)


def readable_outcome(ledger: pa.Table) -> Outcome:
    """The files of one load (its ledger rows) that could not be read."""
    bad = ledger.filter(pc.is_valid(ledger.column("file_error"))).select(["path", "file_error"]).to_pylist()
    return Outcome(
        FILES_READABLE, failed=len(bad), sample=[{"source_file": f["path"], "error": f["file_error"]} for f in bad[:50]]
    )


def accounted_outcome(ledger: pa.Table, stored: pa.Table, rejected: pa.Table) -> Outcome:
    """For every file of one load: read = written + rejected + duplicates in the ledger, and the tables hold
    exactly `written` rows and `rejected` line rejects of it (plus its one file record if it could not be read)."""
    in_table = _counts(stored.column("source_file"))
    line_rejects = _counts(rejected.filter(pc.is_valid(rejected.column("source_row"))).column("source_file"))
    file_rejects_ = _counts(rejected.filter(pc.is_null(rejected.column("source_row"))).column("source_file"))
    outcome = Outcome(LINES_ACCOUNTED)
    for row in ledger.to_pylist():
        path = row["path"]
        problems = []
        if row["lines_read"] != row["lines_written"] + row["lines_rejected"] + row["lines_duplicate"]:
            problems.append("read != written + rejected + duplicates")
        if in_table.get(path, 0) != row["lines_written"]:
            problems.append(f"table holds {in_table.get(path, 0)} rows, ledger says {row['lines_written']} written")
        if line_rejects.get(path, 0) != row["lines_rejected"]:
            problems.append(f"market.rejected holds {line_rejects.get(path, 0)} lines, ledger says {row['lines_rejected']}")
        if file_rejects_.get(path, 0) != (row["file_error"] is not None):
            problems.append("the file's own rejected record does not match its error")
        if problems:
            outcome.failed += 1
            if len(outcome.sample) < 50:
                outcome.sample.append({"source_file": path, "problems": problems})
    known = set(ledger.column("path").to_pylist())
    for path in sorted((set(in_table) | set(line_rejects) | set(file_rejects_)) - known):
        outcome.failed += 1
        outcome.sample.append({"source_file": path, "problems": ["rows in the tables from a file the ledger does not list"]})
    return outcome


def _counts(column) -> dict[str, int]:
    if len(column) == 0:
        return {}
    return {v["values"]: v["counts"] for v in pc.value_counts(column).to_pylist() if v["values"] is not None}

"""Helpers shared by the benchmark modules (private: not itself a benchmark)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BenchUnavailable(Exception):
    """A benchmark cannot run here (e.g. its input data is absent); the message says why."""


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    """Wall-clock seconds of N repetitions of one stage, and how many rows each repetition handled."""

    seconds: list[float] = field(default_factory=list)
    rows: int = 0

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, seconds: float) -> float:
        return self.rows / seconds if seconds else float("inf")

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "repetitions": len(self.seconds),
            "best_s": self.best,
            "median_s": self.median,
            "rows_per_s_best": self.rate(self.best),
            "rows_per_s_median": self.rate(self.median),
        }


def profile_rows(stats) -> dict[str, dict]:
    """A pstats.Stats as {"path:line(function)": calls, own and cumulative seconds}, paths relative to the repo or
    site-packages."""
    rows = {}
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = os.path.relpath(filename, REPO) if filename.startswith(str(REPO)) else filename.rsplit("site-packages/", 1)[-1]
        rows[f"{where}:{line}({func})"] = {"calls": ncalls, "own_s": round(tottime, 4), "cumulative_s": round(cumtime, 4)}
    return rows


def row(stage: str, k2: str, raw: str, ratio: float | None, goal: str, met: bool | None) -> dict:
    """One line of `make bench`'s closing table: K2 beside its raw limit from the same run, the ratio and the verdict."""
    verdict = "—" if met is None else ("PASS" if met else "MISS")
    return {"stage": stage, "k2": k2, "raw": raw, "ratio": ratio, "goal": goal, "verdict": verdict}


def summary_table(rows: list[dict]) -> str:
    """The closing table of a `make bench` run (each benchmark's JSON `summary` rows, in run order)."""
    columns = ("stage", "k2", "raw", "ratio", "goal", "verdict")
    cells = [{**r, "ratio": "" if r["ratio"] is None else f"{r['ratio']:.2f}x"} for r in rows]
    widths = {c: max(len(c), *(len(str(r[c])) for r in cells)) for c in columns}
    header = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = ["Summary: K2 beside its raw limit, measured in the same run", header, "-" * len(header)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in cells]
    return "\n".join(lines)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def environment() -> dict:
    import dagster
    import pandas
    import pandera
    import pyarrow
    import pyiceberg

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "pyarrow": pyarrow.__version__,
            "pyiceberg": pyiceberg.__version__,
            "dagster": dagster.__version__,
            "pandas": pandas.__version__,
            "pandera": pandera.__version__,
        },
    }


def write_results(name: str, results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def footer(results: dict, verdicts_note: str = "") -> str:
    """The closing line of a report: memory, machine load and where the JSON went."""
    load = results["load_average_1min"]
    return (
        f"peak RSS: {results['peak_rss_mb']:.0f} MB; 1-min load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after (other processes skew timings){verdicts_note}; JSON: {results['json']}"
    )


def save(name: str, results: dict, load_before: float) -> dict:
    """Add memory, machine load and the JSON path to `results`, write them, and return them."""
    json_path = Path("bench") / "results" / f"{name}.json"
    results.update(
        peak_rss_mb=peak_rss_mb(), load_average_1min={"before": load_before, "after": os.getloadavg()[0]}, json=str(json_path)
    )
    write_results(name, results)
    progress(f"wrote {json_path}")
    return results

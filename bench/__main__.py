"""Run K2's benchmarks: `python -m bench [--only NAME] [--list] [--summary]` from the repo root.

Every public module of this package that defines `run() -> str` is a benchmark: `run` measures,
writes its JSON under bench/results/, and returns the human-readable report printed here.
Progress goes to stderr, reports to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import traceback

import bench
from bench._common import RESULTS_DIR, BenchUnavailable, summary_table


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_") and not m.ispkg)


def _summary_rows(name: str) -> list[dict]:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()).get("summary", []) if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", metavar="NAME", action="append", help=f"run only this benchmark (repeatable); one of {names}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--summary", action="store_true", help="print the closing table of the last results in bench/results/ without running"
    )
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    if args.summary:
        print(summary_table([r for name in names for r in _summary_rows(name)]))
        return 0
    selected = names
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
        selected = [n for n in names if n in args.only]
    failed, rows = [], []
    for name in selected:
        module = importlib.import_module(f"bench.{name}")
        if not callable(getattr(module, "run", None)):
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            report = module.run()
        except BenchUnavailable as exc:
            print(f"[bench] {name}: cannot run: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        print(report, flush=True)
        rows += _summary_rows(name)
    if rows:
        print(summary_table(rows), flush=True)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

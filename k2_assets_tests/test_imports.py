"""Importing K2's core is cheap and clean: no Dagster, no environment variable changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "k2_assets" / "core"

PROBE = """
import importlib, json, os, sys, time
before = dict(os.environ)
started = time.perf_counter()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "modules": sorted(m.split(".")[0] for m in sys.modules),
                  "dagster": sorted(m for m in sys.modules if m.split(".")[0] == "dagster"),
                  "environ_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))}))
"""


def probe(*modules: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def test_the_wire_codec_imports_in_under_0_3_s_without_dagster():
    runs = [probe("k2_assets.core.live_codec") for _ in range(3)]
    seconds = min(run["seconds"] for run in runs)  # the best of three: a cold disk cache is not K2
    assert seconds < 0.3, [run["seconds"] for run in runs]
    found = runs[-1]
    assert "pyarrow" not in found["modules"], "the producer's codec loads no Arrow (decoding is k2_assets.core.live_decode)"
    assert found["dagster"] == [] and found["environ_changed"] == []


def test_no_core_module_imports_dagster_or_changes_the_environment():
    modules = sorted(f"k2_assets.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    found = probe(*modules)
    assert found["dagster"] == [], found["dagster"][:5]
    assert found["environ_changed"] == []

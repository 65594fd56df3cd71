"""K2 benchmarks: `python -m bench` (from the repo root) runs every module here that defines `run()`."""

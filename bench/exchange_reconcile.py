"""Reconciling a day of 1m bars for 100 symbols (144,000 bars) with the exchange's own: K2 against DuckDB alone.

K2 (core.reconcile) joins both sides, judges every minute (match, mismatch, missing data, left out at a live
capture's edges) and names the fields that differ. The raw limit is the same full join in DuckDB alone,
comparing the same eight fields and counting the minutes that differ, on the same Arrow tables in the same run.
Target: K2 under 1 s.
"""

from __future__ import annotations

import os
import time

import duckdb
import numpy as np
import pyarrow as pa

from bench._common import Timing, footer, progress, row, save
from k2_assets.core import reconcile, rollups

SYMBOLS = 100
MINUTES = 1440
REPS = 5
DIFFERING = 50  # minutes where the exchange's bar is changed, so both sides have something to find

RAW_SQL = f"""
SELECT count(*) FILTER (WHERE k.symbol IS NULL OR e.symbol IS NULL
                        OR {" OR ".join(f"k.{f} IS DISTINCT FROM e.{f}" for f in reconcile.FIELDS)}) AS differing,
       count(*) AS minutes
FROM k2 k FULL OUTER JOIN ex e USING (exchange, symbol, bar_start)
"""


def _decimal(units: np.ndarray) -> pa.Array:
    """decimal(18,8) from integer units of 1e-8, built from the buffers (no Python per value)."""
    return pa.Array.from_buffers(
        pa.decimal128(18, 8), len(units), [None, pa.array(np.stack([units, units >> 63], axis=1).ravel()).buffers()[1]]
    )


def make_day(seed: int = 5) -> tuple[pa.Table, pa.Table, pa.Table]:
    """K2's bars, the exchange's (equal but for DIFFERING minutes) and the capture edges, for one day."""
    rng = np.random.default_rng(seed)
    n = SYMBOLS * MINUTES
    start_us = 1_704_067_200_000_000
    minute = np.tile(np.arange(MINUTES, dtype=np.int64), SYMBOLS)
    symbols = np.repeat(np.array([f"SYM{i:03d}USDT" for i in range(SYMBOLS)], dtype=object), MINUTES)
    low = rng.integers(1_000_000_000, 2_000_000_000, n)
    high = low + rng.integers(0, 1_000_000, n)
    opens, closes = low + (high - low) // 3, low + (high - low) // 2
    volume = rng.integers(1, 10**10, n)
    count = rng.integers(1, 5_000, n)
    columns = {
        "exchange": pa.array(np.full(n, "BINANCE", dtype=object)),
        "symbol": pa.array(symbols),
        "bar_start": pa.array((start_us + minute * 60_000_000).astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "open": _decimal(opens),
        "high": _decimal(high),
        "low": _decimal(low),
        "close": _decimal(closes),
        "volume": _decimal(volume),
        "trade_count": pa.array(count),
        "quote_volume": _decimal(volume // 7),
        "taker_buy_volume": _decimal(volume // 2),
    }
    k2 = pa.table({**columns, "trade_count_all": pa.array(count)})
    changed = np.array(volume)
    changed[rng.choice(n, DIFFERING, replace=False)] += 1
    exchange = pa.table({**columns, "volume": _decimal(changed)})
    edges = pa.table(
        {
            "exchange": pa.array(["BINANCE"] * SYMBOLS),
            "symbol": pa.array([f"SYM{i:03d}USDT" for i in range(SYMBOLS)]),
            "first_at": pa.array([start_us] * SYMBOLS, pa.timestamp("us", tz="UTC")),
            "last_at": pa.array([start_us + 86_399_000_000] * SYMBOLS, pa.timestamp("us", tz="UTC")),
            "first_live": pa.array([False] * SYMBOLS),
            "last_live": pa.array([False] * SYMBOLS),
        }
    )
    return k2, exchange, edges


def run() -> str:
    load_before = os.getloadavg()[0]
    progress(f"exchange_reconcile: making {SYMBOLS * MINUTES:,} bars a side")
    k2, exchange, edges = make_day()
    con = rollups.session()
    raw_con = duckdb.connect()
    raw_con.register("k2", k2)
    raw_con.register("ex", exchange)
    ours, raw = Timing(rows=k2.num_rows), Timing(rows=k2.num_rows)
    for i in range(REPS):
        progress(f"exchange_reconcile: repetition {i + 1}/{REPS}")
        start = time.perf_counter()
        result = reconcile.reconcile(k2, exchange, edges, con)
        ours.seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        differing, minutes = raw_con.execute(RAW_SQL).fetchall()[0]
        raw.seconds.append(time.perf_counter() - start)
    found = result.minutes.num_rows
    assert found == differing == DIFFERING and minutes == k2.num_rows, (found, differing, minutes)
    results = save(
        "exchange_reconcile",
        {
            "bars": k2.num_rows,
            "differing": DIFFERING,
            "k2": ours.as_dict(),
            "raw_duckdb_join": raw.as_dict(),
            "summary": [
                row(
                    f"reconcile {k2.num_rows:,} 1m bars with the exchange's",
                    f"{ours.best:.3f} s",
                    f"the same join in DuckDB alone: {raw.best:.3f} s",
                    ours.best / raw.best,
                    "< 1 s",
                    ours.best < 1,
                )
            ],
        },
        load_before,
    )
    ratio = ours.best / raw.best
    return "\n".join(
        [
            f"reconcile a day of 1m bars: {SYMBOLS} symbols, {k2.num_rows:,} bars a side, {DIFFERING} differing",
            f"  K2 (every minute judged, fields named): best {ours.best:.3f} s, median {ours.median:.3f} s "
            f"-> {'PASS' if ours.best < 1 else 'MISS'} (< 1 s)",
            f"  raw: the same join in DuckDB alone:     best {raw.best:.3f} s, median {raw.median:.3f} s  (ratio {ratio:.1f}x)",
            "  " + footer(results),
        ]
    )

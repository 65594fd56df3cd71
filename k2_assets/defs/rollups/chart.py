"""Candlestick charts of a partition's bars, as PNG embedded in Dagster metadata."""

from __future__ import annotations

import base64
import io

import pyarrow as pa
import pyarrow.compute as pc


def candlestick_png(bars: pa.Table, symbol: str, max_bars: int = 240) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a bar without a price-forming trade has no price to draw
    rows = bars.filter(pc.and_(pc.equal(bars.column("symbol"), symbol), pc.is_valid(bars.column("open")))).sort_by("bar_start")
    rows = rows.slice(max(0, rows.num_rows - max_bars))
    data = {c: rows.column(c).to_pylist() for c in ("bar_start", "open", "high", "low", "close")}
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=80)
    for i, (o, h, lo, c) in enumerate(zip(data["open"], data["high"], data["low"], data["close"])):
        color = "#2e7d32" if c >= o else "#c62828"
        ax.vlines(i, float(lo), float(h), color=color, linewidth=0.8)
        ax.add_patch(plt.Rectangle((i - 0.35, float(min(o, c))), 0.7, max(float(abs(c - o)), 1e-12), color=color))
    ax.set_xlim(-1, max(1, rows.num_rows))
    if rows.num_rows:
        ticks = list(range(0, rows.num_rows, max(1, rows.num_rows // 6)))
        ax.set_xticks(ticks, [data["bar_start"][i].strftime("%H:%M") for i in ticks])
        ax.set_title(f"{symbol}  {data['bar_start'][0]:%Y-%m-%d %H:%M} – {data['bar_start'][-1]:%H:%M} UTC", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def markdown_charts(bars: pa.Table, symbols: int = 2) -> str:
    """Markdown with the busiest symbols' charts inline (the UI renders data: images)."""
    if bars.num_rows == 0:
        return "no bars"
    counts = pc.value_counts(bars.column("symbol")).to_pylist()
    top = [c["values"] for c in sorted(counts, key=lambda c: -c["counts"])[:symbols]]
    return "\n\n".join(f"![{s}](data:image/png;base64,{base64.b64encode(candlestick_png(bars, s)).decode()})" for s in top)

"""Arrow tables on a terminal or in a file: the one renderer for table, csv and json output."""

from __future__ import annotations

import csv
import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

FORMATS = ("table", "csv", "json")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return text if text != "-0" else "0"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list):
        if value and isinstance(value[0], tuple):  # a map
            return ";".join(f"{k}={'' if v is None else v}" for k, v in value)
        return " ".join(_cell(v) for v in value)
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, (Decimal, datetime, date)):
        return _cell(value)
    if isinstance(value, list):
        if value and isinstance(value[0], tuple):
            return {k: v for k, v in value}
        return [_json_value(v) for v in value]
    return value


def render(table: pa.Table, fmt: str, out) -> None:
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        json.dump([{k: _json_value(v) for k, v in row.items()} for row in rows], out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        for row in rows:
            w.writerow([_cell(row[n]) for n in names])
    else:
        cells = [[_cell(row[n]) for n in names] for row in rows]
        widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
        out.write("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")

"""Typed columns straight from a vendor file's bytes, by the compiled scanner (vendor_scan.c), for files in the
strict vendor shape; None for any other file (or where the scanner was not built), which the Arrow path decodes
with a reason per line. The scanner releases the GIL, so files decode side by side on a thread pool."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.core.decode import DECIMAL

try:
    from k2_assets.core._vendor_scan import ffi, lib
except ImportError:  # built at install (setup.py); without it every file takes the Arrow path
    ffi = lib = None

# Field kinds, as vendor_scan.c numbers them: the Arrow array each one becomes.
KINDS = {"date": 0, "clock": 1, "decimal": 2, "positive_decimal": 3, "text": 4}


def available() -> bool:
    return lib is not None


def scan(data: bytes, fields: Sequence[str]) -> list[pa.Array] | None:
    """One array per field (date32, int64 microseconds since midnight, decimal(18,8), string), or None if the
    file is not in the strict shape (or empty)."""
    if lib is None or not data:
        return None
    lines = int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10)) + (not data.endswith(b"\n"))
    outputs, texts = [], []
    for kind in fields:
        if kind == "text":
            outputs.append(np.empty(lines + 1, dtype=np.int32))
            texts.append(np.empty(len(data), dtype=np.uint8))
        else:
            outputs.append(np.empty(lines * (2 if "decimal" in kind else 1), dtype=np.int32 if kind == "date" else np.int64))
            texts.append(None)
    # Plain pointers into the arrays of `outputs` and `texts`, which own the memory and outlive the call.
    values = ffi.new("void *[]", [ffi.cast("void *", ffi.from_buffer(a)) for a in outputs])
    text = ffi.new("uint8_t *[]", [ffi.from_buffer("uint8_t[]", t) if t is not None else ffi.NULL for t in texts])
    types = ffi.new("int[]", [KINDS[kind] for kind in fields])
    found = lib.k2_scan(ffi.from_buffer(data), len(data), len(fields), types, values, text)
    if found < 0:
        return None
    if found != lines:
        raise AssertionError(f"the scanner found {found} lines where there are {lines}")
    return [_array(kind, out, body, lines) for kind, out, body in zip(fields, outputs, texts)]


def prefixed_numbers(prefix: str, numbers: pa.Array) -> pa.StringArray:
    """`prefix` followed by each number's digits (numbers not negative, none null): message ids from sequences."""
    head = prefix.encode()
    n = len(numbers)
    if lib is None or n * (len(head) + 19) >= 2**31:
        return pc.binary_join_element_wise(prefix, pc.cast(numbers, pa.string()), "")
    values = np.ascontiguousarray(numbers.to_numpy(), dtype=np.int64)
    offsets = np.empty(n + 1, dtype=np.int32)
    data = np.empty(n * (len(head) + 19), dtype=np.uint8)
    used = lib.k2_join_numbers(
        head,
        len(head),
        ffi.from_buffer("int64_t[]", values),
        n,
        ffi.from_buffer("int32_t[]", offsets),
        ffi.from_buffer("uint8_t[]", data),
    )
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data[:used].copy())])


def _array(kind: str, values: np.ndarray, text: np.ndarray | None, n: int) -> pa.Array:
    if kind == "date":
        return pa.Array.from_buffers(pa.date32(), n, [None, pa.py_buffer(values)])
    if kind == "clock":
        return pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(values)])
    if kind == "text":
        used = int(values[n])
        return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(values), pa.py_buffer(text[:used].copy())])
    return pa.Array.from_buffers(DECIMAL, n, [None, pa.py_buffer(values)])

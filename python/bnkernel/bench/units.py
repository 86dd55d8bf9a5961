"""Sizes, shapes, thread counts and times as text, both ways: the bench's parsers and formatters.

The parsers raise ``ValueError`` with a message fit for the command line; the formatters return
the short forms the tables print ("1.5 MiB", "12.3 us", "2.1x", "-" for a missing value).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x256x56x56"`` -> ``(32, 256, 56, 56)``: positive integers joined by 'x', ndim >= 2."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(
            f"{text!r} is not a shape: expected at least two positive integers joined by 'x', "
            "channels second, e.g. 32x256x56x56 or 64x3"
        )
    return dims


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """A comma-separated list of shapes, e.g. ``"32x256x56x56,64x3"``."""
    if not text.strip():
        raise ValueError("expected a comma-separated list of shapes such as 32x256x56x56,64x3")
    return [parse_shape(s) for s in text.split(",")]


def parse_choices(text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``choices`` (case-insensitive), in the order given."""
    lookup = {c.lower(): c for c in choices}
    picked: list[str] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if item not in lookup:
            raise ValueError(f"unknown {what} {raw.strip()!r}; choose from {', '.join(choices)}")
        if lookup[item] not in picked:
            picked.append(lookup[item])
    return picked


def parse_threads(text: str) -> list[int]:
    """A comma-separated list of thread counts >= 1, e.g. ``"1,2"``."""
    out: list[int] = []
    for raw in text.split(","):
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{raw.strip()!r} is not a thread count: expected integers >= 1")
        if n not in out:
            out.append(n)
    return out


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:([kmgt])(?:i?b)?|b)?")


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456: a whole number of bytes, with an optional K, M, G or T suffix in
    powers of 1024 ("256MiB", "256MB" and "256m" read the same), e.g. 4096, 64K, 1.5M, 1G."""
    m = _SIZE_RE.fullmatch(text.strip().lower().replace(" ", ""))
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""] if m else 0.0
    if not (value >= 1 and value == int(value)):
        raise ValueError(
            f"{text!r} is not a size: expected a whole number of bytes with an optional K, M or G "
            "suffix (powers of 1024), e.g. 64K, 256M or 1G"
        )
    return int(value)


def shape_text(shape: Sequence[int]) -> str:
    """``(32, 256, 56, 56)`` -> ``"32x256x56x56"``, the form :func:`parse_shape` reads."""
    return "x".join(map(str, shape))


def fmt_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches: exact ("64 KiB") or to one decimal."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def fmt_time(t: float | None) -> str:
    """Seconds as us, ms or s; "-" for no measurement."""
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def fmt_ratio(r: float | None) -> str:
    """A speedup as "2.1x"; "-" for none."""
    return "-" if r is None else f"{r:.1f}x"


def fmt_float(v: float | None, digits: int) -> str:
    """``v`` to ``digits`` decimals; "-" for none or a non-finite value."""
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}"


def fmt_nspb(v: float | None) -> str:
    """ns per byte to 3 significant digits (at least 3 decimals below 1)."""
    if v is None or not math.isfinite(v):
        return "-"
    if v < 1.0:
        return f"{v:.4f}" if v < 0.1 else f"{v:.3f}"
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"

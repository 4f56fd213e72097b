"""Figures of `trainer plan`'s text report in a unit that suits their size, so a tiny model reads `12.50 MiB` and
`340 us` rather than `0.01 GiB` and `0.000 s`, and a large one stays in GiB and seconds (--json keeps raw units)."""

from __future__ import annotations

_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_DECIMAL = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
_FLOP = (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3))
_COUNT = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))


def _scaled(value: float, units: tuple, base: str, digits: int) -> str:
    for name, scale in units:
        if abs(value) >= scale:
            return f"{value / scale:,.{digits}f} {name}"
    return f"{value:,.0f} {base}" if base else f"{value:,.0f}"


def binary_bytes(b: float) -> str:
    """Memory: 80.00 GiB, 12.50 MiB, 3.00 KiB, 512 B."""
    return _scaled(b, _BINARY, "B", 2)


def decimal_bytes(b: float) -> str:
    """Traffic on a link (its bandwidth is decimal): 1.23 GB, 45.60 MB, 0 B."""
    return _scaled(b, _DECIMAL, "B", 2)


def flops(f: float) -> str:
    """Floating-point operations: 1.2 TFLOP, 35.0 MFLOP."""
    return _scaled(f, _FLOP, "FLOP", 1)


def seconds(t: float) -> str:
    """A duration: 1.234 s, 12.3 ms, 45.6 us (ASCII, for any terminal)."""
    if t >= 1 or t == 0:
        return f"{t:,.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.1f} us"


def count(n: float) -> str:
    """A parameter count: 70.55B, 135.0M, 410.5K."""
    for name, scale in _COUNT:
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{name}"
    return f"{n:,.0f}"

"""Sizes as people write them (``512M``, ``2G``) and as they read them (``512 MiB``)."""

from __future__ import annotations

import math

MiB = 1 << 20
GiB = 1 << 30

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeError(ValueError):
    """Text that is not a size; the message says what was wrong."""


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``4096`` -> bytes (binary units; a trailing B/iB is allowed).

    :raise SizeError: if ``text`` is not a non-negative size.
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * SIZE_SUFFIXES[unit]
    except ValueError:
        raise SizeError(f"not a size: {text!r} (try 512M or 1G)") from None
    if not math.isfinite(value):
        raise SizeError(f"not a finite size: {text!r}")
    if value < 0:
        raise SizeError(f"size must not be negative: {text!r}")
    return int(value)


def format_bytes(n: int) -> str:
    """``536870912`` -> ``512 MiB`` (binary units, one decimal when not whole)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            text = f"{n / (1 << shift):.1f}".removesuffix(".0")
            return f"{text} {unit}"
    return f"{n} B"

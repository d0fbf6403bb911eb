"""Sizes with binary units: ``10G``, ``512M``, ``1GiB``, ``4096``."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)

GiB = 1 << 30
MiB = 1 << 20


def parse_size(text: str) -> int:
    """Bytes for ``text``; raises ValueError when it is not a whole number with a unit."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 4096, 512M or 10G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        factor = _UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: int) -> str:
    """A size for people: IEC units with one decimal (``252.0 GiB``); exact bytes below
    1 KiB. Machines get the exact number (``--json``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

"""What hostvolctl prints: JSON or text, tables, key-value lists, the progress bar."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast.signature import Variant  # not the package: it imports the whole bus

from hostvold.core.units import human_size

if TYPE_CHECKING:
    import argparse


def plain(value: Any) -> Any:
    """D-Bus values (variants, structs) as JSON-ready Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    """``data`` as JSON with ``--json``; else the text ``human`` makes."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human())


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def fields(data: dict[str, Any], width: int) -> Callable[[], str]:
    """One ``key value`` line per item, sorted, keys padded to ``width``."""
    return lambda: "\n".join(f"{k:<{width}} {v}" for k, v in sorted(data.items()))


def draw_progress(fraction: float, rate: float) -> None:
    width = 30
    filled = int(width * fraction)
    speed = f" {human_size(int(rate))}/s" if rate >= 1 else ""
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {fraction * 100:5.1f}%{speed}")
    sys.stderr.flush()

"""What hostvolctl prints: JSON or text, tables, key-value lists, the progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast.signature import Variant  # not the package: it imports the whole bus

from hostvold.core.units import human_size

if TYPE_CHECKING:
    import argparse


def plain(value: Any) -> Any:
    """D-Bus values (variants, structs) as JSON-ready Python values. A variant with no
    variant or struct inside (most properties: strings, numbers, arrays of them) is plain
    already: not walked (1,000 volumes' properties are 20,000 values)."""
    if isinstance(value, Variant):
        return plain(value.value) if _nested(value.signature) else value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def plain_properties(properties: dict[str, Variant]) -> dict[str, Any]:
    """An ``a{sv}`` of properties as plain values, the common case inline (the listing of
    1,000 volumes converts 20,000 of them)."""
    return {name: plain(value.value) if _nested(value.signature) else value.value
            for name, value in properties.items()}


def _nested(signature: str) -> bool:
    """Whether a value of this type holds variants or structs (tuples: made lists)."""
    return "v" in signature or "(" in signature


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    """``data`` as JSON with ``--json``; else the text ``human`` makes."""
    if args.json:
        import json  # not for the text most calls print

        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human())


def table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    template = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(template.format(*row).rstrip() for row in cells)


def fields(data: dict[str, Any], width: int) -> Callable[[], str]:
    """One ``key value`` line per item, sorted, keys padded to ``width``."""
    return lambda: "\n".join(f"{k:<{width}} {v}" for k, v in sorted(data.items()))


def draw_progress(fraction: float, rate: float) -> None:
    width = 30
    filled = int(width * fraction)
    speed = f" {human_size(int(rate))}/s" if rate >= 1 else ""
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {fraction * 100:5.1f}%{speed}")
    sys.stderr.flush()

"""What hostvold knows of an image file: a qcow2 header, a layer of a chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# the only formats hostvold lets qemu-img open, always named (-f), never probed
Format = Literal["raw", "qcow2"]


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    size: int
    backing_file: str | None
    backing_format: str | None
    incompatible_features: int
    data_file: str | None
    l1_size: int = 0
    l1_table_offset: int = 0


@dataclass(frozen=True)
class Layer:
    name: str
    format: str


def layer_format(layer: Layer) -> Format:
    """The qemu-img format of a chain layer (only raw and qcow2 ever get this far)."""
    return "raw" if layer.format == "raw" else "qcow2"


FORMAT_UNCONFIRMED = "FormatUnconfirmed:"


def format_problem(base_name: str, claim: str) -> str:
    return (f"{FORMAT_UNCONFIRMED} {base_name} has no trusted format record and its first bytes "
            f"look like {claim}; adopted as raw. Confirm with `hostvolctl repair VOLUME "
            "--format raw` (keep it raw) or `--format qcow2`")

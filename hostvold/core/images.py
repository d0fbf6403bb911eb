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
    cluster_bits: int = 16


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


EXTENDED_L2 = 0x10  # qcow2 incompatible feature: subclusters


def pair_commit_safe(top: Qcow2Header, base_name: str, base_format: str,
                     base: Qcow2Header | None) -> bool:
    """Can ``top`` be committed into ``base`` with the layers below ``base`` cut off?

    Only when every write lands on whole clusters of ``base`` (a raw base, or the same
    cluster size and no subclusters on either side): a partial-cluster write into a qcow2
    base would fill the rest of that cluster from its backing, which is not there."""
    if top.backing_file is None or top.backing_file.rsplit("/", 1)[-1] != base_name \
            or top.backing_format != base_format or top.incompatible_features & EXTENDED_L2:
        return False
    if base_format == "raw":
        return True
    return (base is not None and base.cluster_bits == top.cluster_bits
            and not base.incompatible_features & EXTENDED_L2)

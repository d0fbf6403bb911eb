"""What hostvold knows of an image file: a qcow2 header, a layer of a chain."""

from __future__ import annotations

from dataclasses import dataclass


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

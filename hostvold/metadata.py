"""hostvold's per-volume metadata file: the share alone describes its volumes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from hostvold.atomic import write_atomic
from hostvold.errors import Failed
from hostvold.safefile import read_regular

VolumeState = Literal["creating", "available", "in-use", "busy", "error", "deleting"]
Provisioning = Literal["thin", "thick"]

SCHEMA = 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class VolumeMeta(BaseModel):
    """What hostvold records about a volume, next to its files."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA
    id: str
    size: int
    format: Literal["raw", "qcow2"]
    provisioning: Provisioning = "thin"
    created: str
    state: VolumeState
    share: str
    active: str
    attachment: dict[str, str] | None = None
    # snapshot id -> {"created": ISO time, "quiesced": bool}; which snapshots exist is decided
    # by the info file (Cinder's chain map), this only adds what the info file cannot hold
    snapshots: dict[str, dict[str, Any]] = {}
    # health problems found in the files (stale overlays, damaged info file); operations are
    # refused until an explicit repair
    problems: list[str] = []
    # the in-flight operation, recorded before its first side effect (SPEC section 7)
    operation: dict[str, Any] | None = None

    def evolve(self, **changes: Any) -> VolumeMeta:
        return self.model_validate(self.model_dump() | changes)


def read_meta(path: Path) -> VolumeMeta:
    """The metadata file: a regular file, never followed through a symbolic link (UnsafeFile).
    It sits on shared storage: callers check the file names it records (see
    :func:`hostvold.layout.record_problems`) before acting on them."""
    try:
        return VolumeMeta.model_validate_json(read_regular(path))
    except ValidationError as exc:
        raise Failed(f"metadata file {path} is invalid: {exc.errors()[0]['msg']}") from None


def write_meta(path: Path, meta: VolumeMeta, mode: int) -> None:
    data = json.dumps(meta.model_dump(), indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(path, data, mode)

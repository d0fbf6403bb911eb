"""What hostvold records about a volume, next to its files (the model; reading and writing
the file is :mod:`hostvold.storage.metadata`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

VolumeState = Literal["creating", "available", "in-use", "migrating", "deleting"]
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
    # deleted snapshot id -> the snapshot next older when it went ("" none): where an
    # export of changes from a deleted snapshot falls back to (SPEC section 5b)
    deleted: dict[str, str] = {}

    def evolve(self, **changes: Any) -> VolumeMeta:
        """A copy with ``changes``, each checked against its field's type. The unchanged
        fields are shared, not copied and checked again (a volume with hundreds of snapshots
        would pay for its whole record on every step); records are never changed in place."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"not fields of a volume record: {', '.join(sorted(unknown))}")
        checked = {name: _field_adapter(name).validate_python(value)
                   for name, value in changes.items()}
        return self.model_copy(update=checked)

    def stamped(self, host_id: str) -> VolumeMeta:
        """Which host started the operation and made the attachment (SPEC section 8)."""
        changes: dict[str, object] = {}
        if self.operation is not None and "host" not in self.operation:
            changes["operation"] = {**self.operation, "host": host_id}
        if self.attachment is not None and "host" not in self.attachment:
            changes["attachment"] = {**self.attachment, "host": host_id}
        return self.evolve(**changes) if changes else self


@functools.cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    annotation = VolumeMeta.model_fields[name].annotation
    assert annotation is not None
    return TypeAdapter(annotation)


@dataclass(frozen=True)
class Snapshot:
    id: str
    volume_id: str
    file: str  # the overlay made when it was taken
    created: str
    quiesced: bool


def snapshot_of(meta: VolumeMeta, overlay: str, snapshot_id: str) -> Snapshot:
    """A snapshot as callers see it: the info file's overlay, the record's extras."""
    extra = meta.snapshots.get(snapshot_id, {})
    return Snapshot(snapshot_id, meta.id, overlay, str(extra.get("created", "")),
                    bool(extra.get("quiesced", False)))

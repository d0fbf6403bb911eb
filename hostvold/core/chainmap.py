"""Cinder's chain map of a volume: the active file and, per snapshot, the overlay made when
it was taken (the snapshot's data is that overlay's backing file)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SnapshotMap:
    active: str
    snapshots: dict[str, str] = field(default_factory=dict)

    def without(self, snapshot_id: str, active: str | None = None) -> SnapshotMap:
        rest = {k: v for k, v in self.snapshots.items() if k != snapshot_id}
        return SnapshotMap(active or self.active, rest)

    def with_snapshot(self, snapshot_id: str, overlay: str) -> SnapshotMap:
        return SnapshotMap(overlay, {**self.snapshots, snapshot_id: overlay})

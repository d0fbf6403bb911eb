"""Changed blocks between two points in time of a volume, the pure part (SPEC section 5b).

The overlay made when snapshot S was taken holds exactly what was written after S (its own
allocation, zeroed clusters included), and commit and pull keep the union of the layers they
merge. So what changed from S to T (a later snapshot, or now) is what the layers from S's
overlay up to T's point in time allocate themselves: in ``qemu-img map`` of T's top layer,
every extent of a depth below the number of those layers. No dirty bitmap is kept anywhere.

A snapshot that was deleted leaves behind the snapshot that was the next older one when it
went (:attr:`VolumeMeta.deleted`); an export from it falls back to that one (or further, if
that one went too): a correct superset of the changes, said as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import InvalidArgument, NotFound
from hostvold.core.images import Layer
from hostvold.core.planning import snapshot_data
from hostvold.core.records import VolumeMeta

DELETED_KEPT = 256  # tombstones a volume keeps, the newest ones


@dataclass(frozen=True)
class Extent:
    """One run of the ``to`` point in time, in ovirt-imageio's shape."""

    start: int
    length: int
    dirty: bool  # changed since ``from``
    zero: bool  # reads as zeros

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "dirty": self.dirty,
                "zero": self.zero}


@dataclass(frozen=True)
class ChangeSpan:
    """Which layers an export reads: ``top`` is the ``to`` point in time; the first
    ``depth`` layers from it down hold every change since ``since`` (None: everything)."""

    top: Layer
    depth: int | None
    since: str | None  # the snapshot the changes are counted from
    asked: str | None  # the snapshot the caller asked for
    fallback: bool  # ``since`` is older than ``asked``, which is gone

    @property
    def full(self) -> bool:
        return self.depth is None


def older_snapshot(chain: list[Layer], chain_map: SnapshotMap, snapshot_id: str) -> str:
    """The snapshot next older than ``snapshot_id`` in the chain ("" when none): where an
    export from it falls back to once it is deleted."""
    names = [layer.name for layer in chain]
    overlay = chain_map.snapshots.get(snapshot_id)
    if overlay not in names:
        return ""
    by_overlay = {o: sid for sid, o in chain_map.snapshots.items()}
    for name in names[names.index(overlay) + 1:]:
        if name in by_overlay:
            return by_overlay[name]
    return ""


def tombstoned(meta: VolumeMeta, chain: list[Layer], chain_map: SnapshotMap,
               snapshot_id: str) -> dict[str, str]:
    """The volume's record of deleted snapshots with ``snapshot_id`` (about to be deleted)
    and the snapshot next older than it; the newest :data:`DELETED_KEPT` are kept. A
    temporary snapshot (of a clone or export) is never an export's anchor: left out."""
    if meta.snapshots.get(snapshot_id, {}).get("temporary"):
        return dict(meta.deleted)
    kept = {k: v for k, v in meta.deleted.items() if k != snapshot_id}
    kept[snapshot_id] = older_snapshot(chain, chain_map, snapshot_id)
    return dict(list(kept.items())[-DELETED_KEPT:])


def resolve_span(chain: list[Layer], chain_map: SnapshotMap, deleted: Mapping[str, str],
                 since: str | None, to: str | None, full_if_needed: bool) -> ChangeSpan:
    """The layers the changes from ``since`` to ``to`` live in (None: everything / now).
    ``chain``: the active chain, top first. A deleted ``since`` falls back to the nearest
    older snapshot that survives; with none, a full export when ``full_if_needed``,
    else a named error."""
    names = [layer.name for layer in chain]
    if to is not None and to not in chain_map.snapshots:
        raise NotFound(f"snapshot {to} does not exist")
    top = snapshot_data(chain, chain_map, to) if to is not None else chain[0]
    if since is None:
        return ChangeSpan(top, None, None, None, False)
    used, seen = since, set()
    while used not in chain_map.snapshots:
        if used in seen or used not in deleted:
            if used == since:
                raise NotFound(f"snapshot {since} does not exist, and this volume has no "
                               "record of deleting it")
            break
        seen.add(used)
        used = deleted[used]
        if not used:
            break
    if used not in chain_map.snapshots:
        if full_if_needed:
            return ChangeSpan(top, None, None, since, True)
        raise NotFound(f"snapshot {since} was deleted and no older snapshot survives: a "
                       "full copy is needed (ask again with option full-if-needed)")
    if used == to:  # the same point in time: nothing changed
        return ChangeSpan(top, 0, used, since, used != since)
    low = names.index(chain_map.snapshots[used])
    high = names.index(top.name)
    if low < high:
        raise InvalidArgument(f"snapshot {used} is newer than the point in time asked for")
    return ChangeSpan(top, low - high + 1, used, since, used != since)


def extents(entries: Iterable[Mapping[str, Any]], span: ChangeSpan) -> list[Extent]:
    """The ``to`` point in time's runs from ``qemu-img map --output=json`` of its top,
    marked dirty where one of the span's layers allocates them; neighbours merged."""
    merged: list[Extent] = []
    for entry in entries:
        start, length = int(entry["start"]), int(entry["length"])
        depth = int(entry.get("depth", 0))
        present = bool(entry.get("present", True))
        dirty = span.full or (span.depth is not None and present and depth < span.depth)
        zero = bool(entry.get("zero")) or not present
        last = merged[-1] if merged else None
        if last is not None and (last.dirty, last.zero) == (dirty, zero) and \
                last.start + last.length == start:
            merged[-1] = Extent(last.start, last.length + length, dirty, zero)
        else:
            merged.append(Extent(start, length, dirty, zero))
    return merged


def changed_bytes(runs: Iterable[Extent]) -> int:
    return sum(run.length for run in runs if run.dirty)

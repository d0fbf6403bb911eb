"""Chain planning: given a validated chain and the info file, decide what an operation does.

Pure functions, no I/O. A chain is the list of :class:`~hostvold.core.images.Layer` from the active
file down to the base file. ``info[S]`` is the overlay created when snapshot S was taken; the
snapshot's point-in-time data is that overlay's backing file.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import NeedsRepair, NotFound
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles

# the step of a live delete whose pivot may or may not have happened (its domain is gone):
# only an operator's choice ends it
AMBIGUOUS_PIVOT = "ambiguous-pivot"


@dataclass(frozen=True)
class DeletePlan:
    """Removing snapshot S removes the boundary between ``base`` (S's data) and ``top`` (the
    overlay made when S was taken): ``top`` is committed into ``base`` and then dropped;
    ``higher`` (the layer above ``top``, if any) is re-pointed at ``base``."""

    snapshot_id: str
    top: Layer
    base: Layer
    higher: Layer | None

    @property
    def top_is_active(self) -> bool:
        return self.higher is None


def snapshot_data(chain: list[Layer], chain_map: SnapshotMap, snapshot_id: str) -> Layer:
    """The layer holding the snapshot's point-in-time data (its overlay's backing file)."""
    overlay = _overlay_of(chain_map, snapshot_id)
    names = [layer.name for layer in chain]
    if overlay not in names[:-1]:
        raise NeedsRepair(f"snapshot {snapshot_id}: {overlay} is not in the volume's chain")
    return chain[names.index(overlay) + 1]


def plan_delete(chain: list[Layer], chain_map: SnapshotMap, snapshot_id: str) -> DeletePlan:
    overlay = _overlay_of(chain_map, snapshot_id)
    names = [layer.name for layer in chain]
    if overlay not in names[:-1]:
        raise NeedsRepair(f"snapshot {snapshot_id}: {overlay} is not in the volume's chain")
    position = names.index(overlay)
    return DeletePlan(snapshot_id=snapshot_id, top=chain[position], base=chain[position + 1],
                      higher=chain[position - 1] if position > 0 else None)


def _overlay_of(chain_map: SnapshotMap, snapshot_id: str) -> str:
    try:
        return chain_map.snapshots[snapshot_id]
    except KeyError:
        raise NotFound(f"snapshot {snapshot_id} does not exist") from None


def map_from_chain(files: VolumeFiles, chain: list[Layer]) -> SnapshotMap:
    """The info file a chain implies: overlay names carry the id of their snapshot."""
    prefix = f"{files.base_name}."
    snapshots = {layer.name[len(prefix):]: layer.name for layer in chain[:-1]
                 if layer.name.startswith(prefix)}
    return SnapshotMap(chain[0].name, snapshots)


def chain_problems(files: VolumeFiles, chain: list[Layer], chain_map: SnapshotMap,
                   present: set[str] | None = None) -> list[str]:
    """What differs between the info file, the chain and (when given) the image files
    present in the directory. Empty: healthy."""
    problems = []
    names = [layer.name for layer in chain]
    in_chain = set(names)  # membership per snapshot: linear in the depth, not quadratic
    if chain[-1].name != files.base_name:
        problems.append(f"the chain ends at {chain[-1].name}, not at the base file")
    for snapshot_id, overlay in sorted(chain_map.snapshots.items()):
        if present is not None and overlay not in present:
            problems.append(f"snapshot {snapshot_id}: its file {overlay} is missing")
        elif overlay not in in_chain:
            problems.append(f"snapshot {snapshot_id}: {overlay} is not in the active chain")
    recorded = set(chain_map.snapshots.values())
    for name in names[:-1]:
        if name not in recorded:
            problems.append(f"{name} is in the chain but not in the info file")
    for name in sorted((present or set()) - in_chain):
        problems.append(f"{name} is not used by the volume (stale overlay)")
    return problems

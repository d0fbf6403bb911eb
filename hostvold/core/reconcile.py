"""A volume's record brought in line with its share (pure).

For snapshots and the active file the info file (Cinder's chain map) and the qcow2 chain
are the truth; the record (``.meta``) only adds what they cannot hold: size, format,
created times, quiesced flags, attachment, the in-flight operation. Another writer of the
share (another host, Cinder's own driver, an operator) may have changed them; these
functions say what the record becomes and what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import HostvoldError
from hostvold.core.images import FORMAT_UNCONFIRMED, Layer
from hostvold.core.records import VolumeMeta

# problems a look at the info file and the chain cannot judge, kept until a check or a
# repair: a format only the operator can confirm, a record naming foreign files, and files
# beside the chain (only a listing of the directory finds those)
_KEPT_PREFIXES = (FORMAT_UNCONFIRMED, "UntrustedRecord")
STALE_SUFFIX = "(stale overlay)"


@dataclass(frozen=True)
class ShareView:
    """What the share says of one volume's chain, read from the info file and headers.

    ``chain_map`` is None when the info file cannot be trusted (then ``problems`` says
    why); ``created`` gives the modification time of each overlay the map names that
    exists (a snapshot the record does not know gets its overlay's time). ``error``: the
    files cannot be trusted (a damaged info file, a symbolic link in the chain); it is
    recorded as a problem and then raised, as an operation's own check does."""

    chain_map: SnapshotMap | None
    problems: list[str] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)
    error: HostvoldError | None = None
    chain: list[Layer] = field(default_factory=list)  # walked from the active file down


def busy(meta: VolumeMeta) -> bool:
    """An operation is under way on the volume (its files may be mid-change)."""
    return meta.operation is not None or meta.state in ("creating", "deleting")


def kept_problem(problem: str) -> bool:
    return problem.startswith(_KEPT_PREFIXES) or problem.endswith(STALE_SUFFIX)


def merge_record(meta: VolumeMeta, view: ShareView) -> VolumeMeta:
    """``meta`` with its snapshots and active file taken from the share: a snapshot the
    info file no longer has is gone, one it gained appears; the record keeps its own
    extras (created, quiesced) for the snapshots both know. Problems: what the share shows
    now, plus those this view cannot judge (:func:`kept_problem`)."""
    problems = list(dict.fromkeys(
        view.problems + [p for p in meta.problems if kept_problem(p)]))
    if set(problems) == set(meta.problems):
        problems = list(meta.problems)  # the same problems: keep their order
    if view.chain_map is None:
        return meta.evolve(problems=problems)
    snapshots: dict[str, dict[str, Any]] = {}
    for sid, overlay in view.chain_map.snapshots.items():
        snapshots[sid] = meta.snapshots.get(sid) or {
            "created": view.created.get(overlay, ""), "quiesced": False}
    return meta.evolve(active=view.chain_map.active, snapshots=snapshots, problems=problems)


def record_changes(old: VolumeMeta | None, new: VolumeMeta | None) -> list[str]:
    """What differs between two records of one volume, one line per change."""
    if old is None or new is None:
        if old is new:
            return []
        return ["volume appeared" if old is None else "volume is gone"]
    lines = []
    if old.active != new.active:
        lines.append(f"active file {old.active} -> {new.active}")
    gone = sorted(set(old.snapshots) - set(new.snapshots))
    found = sorted(set(new.snapshots) - set(old.snapshots))
    if gone:
        lines.append(f"snapshots gone: {', '.join(gone)}")
    if found:
        lines.append(f"snapshots found: {', '.join(found)}")
    for name in ("size", "format", "state", "share", "attachment", "operation"):
        if getattr(old, name) != getattr(new, name):
            lines.append(f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}")
    solved = [p for p in old.problems if p not in new.problems]
    raised = [p for p in new.problems if p not in old.problems]
    if solved:
        lines.append(f"problems cleared: {'; '.join(solved)}")
    if raised:
        lines.append(f"problems found: {'; '.join(raised)}")
    return lines

"""What a share says of one volume's chain: its info file and the image headers, read
in-process (no qemu-img), with no listing of the share's directory."""

from __future__ import annotations

import os
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

from hostvold.core.errors import InfoFileDamaged, UnsafeFile
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.planning import chain_problems
from hostvold.core.reconcile import STALE_SUFFIX, ShareView
from hostvold.storage.infofile import read_info_stamped
from hostvold.storage.qcow2 import chain_from_top, remember_chain, validate_chain
from hostvold.storage.stamped import Stamp


def observe_chain(files: VolumeFiles, base_format: str, known: Collection[str] = (),
                  top_only: bool = False) -> ShareView:
    """The info file, the chain from its active file down, and what differs between them.

    Costs one small read (the info file), one open per layer (a header read for each that
    changed), and one ``lstat`` per overlay the info file names and the walk did not see.
    Overlays beside the chain that the info file does not name are not looked for here
    (that needs a listing; :meth:`RepairOps.check` does it). ``known``: the snapshot ids
    the record already has (no created time is needed). ``top_only``: the layers below
    the active file are opened only when the info file changed since they were last walked
    (:func:`chain_from_top`; for a snapshot create)."""
    try:
        chain_map, info_stamp = read_info_stamped(files)
    except InfoFileDamaged as exc:  # damaged, a symbolic link, a device: a named problem
        return ShareView(None, [exc.message], error=exc)
    top_format = base_format if chain_map.active == files.base_name else "qcow2"
    error = None
    chain_names: set[str] = set()
    try:  # a hostile header (a foreign backing file, a loop) is raised, never recorded
        chain = _walk(files, chain_map.active, top_format, info_stamp, top_only)
    except FileNotFoundError as exc:
        problems = [f"{Path(str(exc.filename)).name}, a file of the chain, is missing"]
    except UnsafeFile as exc:  # a symbolic link, a device among the layers
        problems, error = [exc.message], exc
    else:
        chain_names = {layer.name for layer in chain}
        problems = []
    present, created = set(chain_names), {}
    directory = str(files.directory)
    for sid, overlay in chain_map.snapshots.items():
        if overlay in chain_names and sid in known:
            continue  # seen by the walk, and its created time is on record
        try:
            mtime = os.lstat(f"{directory}/{overlay}").st_mtime
        except FileNotFoundError:
            continue
        present.add(overlay)
        if sid not in known:
            created[overlay] = datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds")
    found: list[str] = []
    if chain_names:
        found = chain_problems(files, chain, chain_map, present)
        # a stale overlay is also "not in the active chain": said once
        problems = [p for p in found if not p.endswith(STALE_SUFFIX)]
    healthy = chain if chain_names and not found else []  # an operation may use this walk
    return ShareView(chain_map, problems, created, error, healthy)


def _walk(files: VolumeFiles, top: str, top_format: str, info_stamp: Stamp | None,
          top_only: bool) -> list[Layer]:
    """The validated chain from ``top`` down; a whole walk is kept for its info file."""
    if top_only and info_stamp is not None:
        chain = chain_from_top(files, info_stamp, top, top_format)
        if chain is not None:
            return chain
    chain = validate_chain(files, top, top_format)
    if info_stamp is not None:
        remember_chain(files, info_stamp, chain)
    return chain

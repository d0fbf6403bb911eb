"""The info file: Cinder's JSON chain map, ``volume-<id>.info``.

``{"active": <file the volume runs on>, <snapshot id>: <overlay made when it was taken>}``,
bare file names, written pretty-printed (indent 1, keys sorted) as Cinder does, but
atomically. A missing file means "no snapshots, the base file is active".
"""

from __future__ import annotations

import json

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import InfoFileDamaged, UnsafeFile
from hostvold.core.ids import valid_id
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles
from hostvold.storage.atomic import write_atomic
from hostvold.storage.qcow2 import remember_chain
from hostvold.storage.safefile import read_regular
from hostvold.storage.stamped import Stamp, StampedCache

_PARSED: StampedCache[SnapshotMap] = StampedCache(min_size=4096)  # deep chains only


def cinder_json(data: dict[str, str]) -> str:
    """The bytes ``json.dumps(data, indent=1, sort_keys=True)`` gives for a flat map of
    strings, Cinder's layout, from json's C encoder: ``indent`` alone sends json to its
    pure-Python encoder, twice as slow on the 32 KiB map of a 256-snapshot chain, which a
    snapshot create and delete write each time (P8). The separators put each entry on a line
    of its own, indented by one space, exactly as ``indent=1`` does one level deep."""
    if not data:
        return "{}"
    inner = json.dumps(data, sort_keys=True, separators=(",\n ", ": "))
    return "{\n " + inner[1:-1] + "\n}"


def read_info(files: VolumeFiles) -> SnapshotMap:
    """The chain map of a volume; InfoFileDamaged when it cannot be trusted (a symbolic
    link, a device, or names that are not the volume's own files)."""
    return read_info_stamped(files)[0]


def read_info_stamped(files: VolumeFiles) -> tuple[SnapshotMap, Stamp | None]:
    """:func:`read_info`, and the stamp of the file read (None: there is no info file)."""
    try:
        return _PARSED.get_stamped(files.info, lambda: _parse(files))
    except FileNotFoundError:
        return SnapshotMap(files.base_name), None


def _parse(files: VolumeFiles) -> SnapshotMap:
    try:
        data = read_regular(files.info)
    except UnsafeFile as exc:
        raise InfoFileDamaged(f"{exc.message}; run a repair") from None
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InfoFileDamaged(f"{files.info.name} is empty or truncated "
                              f"({len(data)} bytes); run a repair") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("active"), str):
        raise InfoFileDamaged(f"{files.info.name} has no \"active\" entry; run a repair")
    snapshots = {}
    for key, value in raw.items():
        if key == "active":
            continue
        try:
            snapshot_id = valid_id(key, "snapshot id")
        except Exception:
            raise InfoFileDamaged(f"{files.info.name}: {key!r} is not a snapshot id") from None
        if not isinstance(value, str) or not files.is_image(value):
            raise InfoFileDamaged(f"{files.info.name}: snapshot {key} names {value!r}, which is "
                                  "not one of the volume's files")
        snapshots[snapshot_id] = value
    if not files.is_image(raw["active"]):
        raise InfoFileDamaged(f"{files.info.name}: active file {raw['active']!r} is not one of "
                              "the volume's files")
    return SnapshotMap(raw["active"], snapshots)


def write_info(files: VolumeFiles, chain_map: SnapshotMap, mode: int,
               chain: list[Layer] | None = None) -> None:
    """``chain``: the chain from the new active file down, when the caller knows it
    checked (it just put a new overlay on a validated chain): kept for this very file."""
    data = {"active": chain_map.active, **chain_map.snapshots}
    stamp = write_atomic(files.info, cinder_json(data).encode(), mode)
    _PARSED.remember(files.info, stamp, chain_map)
    if chain is not None:
        remember_chain(files, stamp, chain)

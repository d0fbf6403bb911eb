"""Health of a volume's files and their repair: the info file rebuilt from the chain the
image headers describe, losing no data still present; a format confirmed by the operator."""

from __future__ import annotations

import logging
from pathlib import Path

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import HostvoldError, InfoFileDamaged, InvalidArgument, NeedsRepair
from hostvold.core.images import FORMAT_UNCONFIRMED, Format, Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.planning import chain_problems, map_from_chain
from hostvold.core.records import VolumeMeta
from hostvold.ops.store import VolumeStore, share_call
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.files import file_mtime
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import header_claim, qcow2_is_empty, read_qcow2_header, validate_chain

log = logging.getLogger(__name__)


class RepairOps:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store

    async def check(self, volume_id: str) -> list[str]:
        """Every difference between the info file, the chain and the files present, recorded
        on the volume as its health problems (empty: healthy)."""
        meta = self.store.get_volume(volume_id)
        files = self.store.files_of(meta)

        def look() -> list[str]:  # in the share's pool: a listing and a walk of the chain
            present = {path.name for path in files.existing() if files.is_image(path.name)}
            try:
                chain_map = read_info(files)
                fmt = meta.format if chain_map.active == files.base_name else "qcow2"
                chain = validate_chain(files, chain_map.active, fmt)
                return chain_problems(files, chain, chain_map, present)
            except InfoFileDamaged as exc:
                return [exc.message]
            except FileNotFoundError as exc:
                return [f"{Path(str(exc.filename)).name}, a file of the chain, is missing"]

        problems = await share_call(self.store, meta, look)
        if problems != meta.problems:
            await self.store.record(files, meta.evolve(problems=problems))
        return problems

    async def repair(self, files: VolumeFiles, meta: VolumeMeta, fmt: Format | None) -> list[str]:
        """Confirm the format if asked (required while it is unconfirmed), then make the info
        file describe the chain the files form. Returns what was done."""
        done = []
        unconfirmed = [p for p in meta.problems if p.startswith(FORMAT_UNCONFIRMED)]
        if fmt is not None:
            meta, line = await self._confirm_format(files, meta, fmt)
            done.append(line)
        elif unconfirmed:
            raise NeedsRepair(f"{unconfirmed[0]} (nothing was changed)")
        return done + await self._repair(files, meta)

    async def _confirm_format(self, files: VolumeFiles, meta: VolumeMeta,
                        fmt: Format) -> tuple[VolumeMeta, str]:
        """The base file's format as the operator confirms it, after showing the header."""
        claim = header_claim(files.base) or "no qcow2 header"
        if fmt != meta.format and (meta.snapshots or meta.active != files.base_name):
            raise InvalidArgument(f"volume {meta.id} has snapshots whose overlays record "
                                  f"the base format {meta.format}; it cannot be changed")
        if fmt == "qcow2":
            validate_chain(files, files.base_name, "qcow2")  # standalone, no data file
            size = read_qcow2_header(files.base).size
        else:
            size = files.base.lstat().st_size if meta.format != "raw" else meta.size
        problems = [p for p in meta.problems if not p.startswith(FORMAT_UNCONFIRMED)]
        return (meta.evolve(format=fmt, size=size, problems=problems),
                f"format of {files.base_name} confirmed as {fmt} (its first bytes show "
                f"{claim})")

    async def _repair(self, files: VolumeFiles, meta: VolumeMeta) -> list[str]:
        images = {p.name for p in files.existing() if files.is_image(p.name)}
        if files.base_name not in images:
            raise NeedsRepair(f"the base file {files.base_name} is missing; it cannot be "
                              "rebuilt")
        chains: dict[str, list[Layer]] = {}
        for name in images:
            fmt = meta.format if name == files.base_name else "qcow2"
            try:
                chain = validate_chain(files, name, fmt)
            except FileNotFoundError:
                continue  # a chain broken below this file: it cannot be the volume's
            if chain[-1].name == files.base_name:
                chains[name] = chain
        used_below = {layer.name for chain in chains.values() for layer in chain[1:]}
        tops = sorted(name for name in chains if name not in used_below)
        holding = [name for name in tops if name == files.base_name
                   or not qcow2_is_empty(files.directory / name)]
        if len(holding) > 1:
            raise NeedsRepair(f"several files hold newer data ({', '.join(holding)}); "
                              "nothing was changed, decide by hand which one is current")
        # with only empty overlays on top, the longest chain keeps every snapshot boundary
        active = holding[0] if holding else max(tops, key=lambda name: len(chains[name]))
        chain = chains[active]
        in_chain = {layer.name for layer in chain}
        strays = sorted(images - in_chain)
        keep = [name for name in strays if not _stray_is_removable(files, name)]
        if keep:
            raise NeedsRepair(f"{', '.join(keep)} hold data outside the volume's chain; "
                              "nothing was changed, move them away by hand")
        done = []
        new_map = map_from_chain(files, chain)
        try:
            old_map: SnapshotMap | None = await share_call(self.store, meta, read_info, files)
        except InfoFileDamaged:
            old_map = None
        if old_map != new_map:
            await share_call(self.store, meta, write_info, files, new_map, self.store.file_mode)
            done.append(f"info file rewritten: active {new_map.active}, "
                        f"{len(new_map.snapshots)} snapshots")
        for name in strays:
            await share_call(self.store, meta, unlink_durable, files.directory / name)
            done.append(f"removed {name} (it held no data)")
        snapshots = {}
        for sid, overlay in new_map.snapshots.items():
            snapshots[sid] = meta.snapshots.get(sid) or {
                "created": file_mtime(files.directory / overlay), "quiesced": False}
        await self.store.record(files, meta.evolve(active=new_map.active, snapshots=snapshots,
                                               problems=[]))
        for line in done:
            log.warning("repair of volume %s: %s", meta.id, line)
        return done


def _stray_is_removable(files: VolumeFiles, name: str) -> bool:
    """A file outside the chain may go only if it is an overlay holding no data."""
    if name == files.base_name:
        return False
    try:
        return qcow2_is_empty(files.directory / name)
    except (HostvoldError, OSError):
        return False

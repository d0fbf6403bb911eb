"""Snapshot chains of detached volumes: create, delete, revert, clone, create-from-snapshot,
repair. Offline only: ``qemu-img`` on files no domain has open.

Each operation is a small state machine recorded in the volume's metadata
(``operation={"name": ..., "step": ...}``) before each side effect. Every step is
idempotent, so recovery simply resumes at the recorded step.

create-snapshot (S, overlay O = ``volume-<id>.<S>``)
    ``overlay``: intent recorded; next: create O (empty, ``-u``, relative backing, format
    given), then write the info file (``active=O``, ``S=O``), then the metadata.
    Recovery: the info file decides. S in it: finish (metadata follows the info file).
    Not in it: remove O; the volume is as before.

delete-snapshot (S; top = info[S], base = its backing, higher = the layer above top)
    ``commit``: ``qemu-img commit -d top`` into base. Waits for qemu-img. Re-running it is
        harmless: top is unchanged and still shadows base, so every reader of the chain sees
        the same bytes. Next: ``relink``.
    ``relink``: ``qemu-img rebase -u`` higher onto base (metadata only), then the info file
        without S (``active=base`` when top was active), then the metadata. Next: ``remove``.
    ``remove``: unlink top, clear the operation.
    Recovery: resume at the recorded step (forward only: once commit may have started, the
    snapshot's own data is no longer guaranteed, while all other data is).

revert (to the newest snapshot S)
    ``replace``: intent recorded; an empty overlay on S's data is written under a temp name
    and renamed over info[S] (one atomic step). Recovery: remove temp files, clear it.

repair
    Rebuilds the info file from the chain that the image headers describe, keeps every file
    that holds data, removes only overlays that hold none. Refuses (changing nothing) when
    that choice is not unambiguous.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostvold.core import crash
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import (
    AlreadyExists,
    HostvoldError,
    InfoFileDamaged,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
    NotFound,
    UnsafeImage,
)
from hostvold.core.ids import new_id, valid_id
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles, record_problems, temp_name
from hostvold.core.models import CopyVolume
from hostvold.core.planning import (
    AMBIGUOUS_PIVOT,
    chain_problems,
    map_from_chain,
    plan_delete,
    snapshot_data,
)
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.ops.volumes import (
    FORMAT_UNCONFIRMED,
    VolumeService,
    file_mtime,
    header_claim,
    layer_format,
)
from hostvold.storage import qemuimg
from hostvold.storage.atomic import fsync_dir, unlink_durable
from hostvold.storage.files import fsync_file
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import qcow2_is_empty, read_qcow2_header, validate_chain
from hostvold.storage.qemuimg import Format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    id: str
    volume_id: str
    file: str  # the overlay made when it was taken
    created: str
    quiesced: bool


class SnapshotService:
    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes
        volumes.recoverers.update({
            "create-snapshot": self._recover_create,
            "delete-snapshot": self._resume_delete,
            "revert": self._recover_revert,
        })

    # ---- queries --------------------------------------------------------------------

    def list_snapshots(self, volume_id: str) -> list[Snapshot]:
        meta = self.volumes.get_volume(volume_id)
        files = self.volumes.files_of(meta)
        chain_map = read_info(files)
        return sorted((self._snapshot(meta, chain_map, sid) for sid in chain_map.snapshots),
                      key=lambda snap: (snap.created, snap.id))

    def _snapshot(self, meta: VolumeMeta, chain_map: SnapshotMap, sid: str) -> Snapshot:
        extra = meta.snapshots.get(sid, {})
        return Snapshot(sid, meta.id, chain_map.snapshots[sid], str(extra.get("created", "")),
                        bool(extra.get("quiesced", False)))

    # ---- create ---------------------------------------------------------------------------

    async def create_snapshot(self, volume_id: str, snapshot_id: str | None = None) -> Snapshot:
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id") if snapshot_id is not None else new_id()
        volumes = self.volumes
        async with volumes.locks.volume(volume_id):
            _meta, users = await volumes.observe(volume_id)
            meta = volumes.require_idle(volume_id)
            files = volumes.files_of(meta)
            chain_map, chain = volumes.validated_chain(files, meta)
            overlay = files.overlay_name(sid)
            if sid in chain_map.snapshots or os.path.lexists(files.directory / overlay):
                raise AlreadyExists(f"snapshot {sid} of volume {volume_id} already exists")
            if meta.state == "in-use":
                meta = await volumes.require_live().create_snapshot(meta, files, chain_map,
                                                                    chain, sid)
                log.info("created snapshot %s of attached volume %s", sid, volume_id,
                         extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
                return self._snapshot(meta, read_info(files), sid)
            users.refuse_live("take an offline snapshot of", volume_id)
            top = chain[0]
            meta = volumes.record(files, meta.evolve(operation={
                "name": "create-snapshot", "snapshot": sid, "overlay": overlay,
                "step": "overlay"}))
            crash.point("create-snapshot:intent")
            try:
                path = files.directory / overlay
                await qemuimg.create(path, "qcow2", meta.size, backing=top.name,
                                     backing_fmt=layer_format(top))
                os.chmod(path, volumes.file_mode)
                await asyncio.to_thread(fsync_file, path)
                crash.point("create-snapshot:overlay")
                write_info(files, chain_map.with_snapshot(sid, overlay), volumes.file_mode)
                crash.point("create-snapshot:info")
            except BaseException:
                await self._recover_create(files, meta)
                raise
            meta = volumes.record(files, meta.evolve(
                active=overlay, operation=None,
                snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": False}}))
            await volumes.follow_definitions(files, volume_id)
            log.info("created snapshot %s of volume %s", sid, volume_id,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
            return self._snapshot(meta, chain_map.with_snapshot(sid, overlay), sid)

    async def _recover_create(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        assert meta.operation is not None
        sid, overlay = meta.operation["snapshot"], meta.operation["overlay"]
        chain_map = read_info(files)
        if chain_map.snapshots.get(sid) == overlay:  # the info file was written: finish
            self.volumes.record(files, meta.evolve(
                active=chain_map.active, operation=None,
                snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": False}}))
        else:  # not taken: the overlay is new, empty and referenced by nothing
            unlink_durable(files.directory / overlay)
            self.volumes.record(files, meta.evolve(operation=None))

    # ---- delete ---------------------------------------------------------------------------

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        volumes = self.volumes
        async with volumes.locks.volume(volume_id):
            meta = volumes.get_volume(volume_id)
            op = meta.operation
            if op and op.get("name") == "delete-snapshot" and op.get("snapshot") == sid:
                return await volumes.recover_volume(meta)  # a retry, its record checked
            if op and op.get("name") == "live-delete-snapshot" and op.get("snapshot") == sid:
                return await volumes.recover_volume(meta)  # a retry
            _meta, users = await volumes.observe(volume_id)
            meta = volumes.require_idle(volume_id)
            files = volumes.files_of(meta)
            chain_map, chain = volumes.validated_chain(files, meta)
            if meta.state == "in-use":
                if sid not in chain_map.snapshots:
                    raise NotFound(f"snapshot {sid} does not exist")
                await volumes.require_live().deleter.delete_snapshot(meta, files, chain_map,
                                                                     chain, sid)
                log.info("deleted snapshot %s of attached volume %s", sid, volume_id,
                         extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
                return None
            users.refuse_live("delete a snapshot of", volume_id)
            plan = plan_delete(chain, chain_map, sid)
            # one qemu-img process reads the whole chain: it must see what the headers say
            seen = await qemuimg.info_chain(files.directory / chain[0].name, layer_format(chain[0]),
                                            volumes.limits)
            if [Path(layer.filename).name for layer in seen] != [layer.name for layer in chain]:
                raise UnsafeImage(f"qemu-img sees a different chain for volume {volume_id}; "
                                  "nothing was changed")
            meta = volumes.record(files, meta.evolve(operation={
                "name": "delete-snapshot", "snapshot": sid, "step": "commit",
                "top": plan.top.name, "base": plan.base.name, "base_format": plan.base.format,
                "higher": plan.higher.name if plan.higher else None}))
            crash.point("delete-snapshot:intent")
            await self._resume_delete(files, meta)
            await volumes.follow_definitions(files, volume_id)
            log.info("deleted snapshot %s of volume %s", sid, volume_id,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})

    async def _resume_delete(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        """Run the delete from its recorded step to the end (also the recovery)."""
        op: dict[str, Any] = dict(meta.operation or {})
        directory = files.directory
        top, base, higher = op["top"], op["base"], op["higher"]
        if op["step"] == "commit":
            await qemuimg.commit(directory / top, "qcow2", drop=True, limits=self.volumes.limits)
            crash.point("delete-snapshot:commit")
            op["step"] = "relink"
            meta = self.volumes.record(files, meta.evolve(operation=op))
            crash.point("delete-snapshot:relink-recorded")
        if op["step"] == "relink":
            if higher is not None:
                await qemuimg.rebase_unsafe(directory / higher, "qcow2", base, op["base_format"],
                                            limits=self.volumes.limits)
                crash.point("delete-snapshot:rebase")
            chain_map = read_info(files)
            new_map = chain_map.without(op["snapshot"], active=base if higher is None else None)
            write_info(files, new_map, self.volumes.file_mode)
            crash.point("delete-snapshot:info")
            op["step"] = "remove"
            snapshots = {k: v for k, v in meta.snapshots.items() if k != op["snapshot"]}
            meta = self.volumes.record(files, meta.evolve(active=new_map.active, operation=op,
                                                          snapshots=snapshots))
            crash.point("delete-snapshot:remove-recorded")
        if op["step"] == "remove":
            unlink_durable(directory / top)
            crash.point("delete-snapshot:unlinked")
            self.volumes.record(files, meta.evolve(operation=None))

    # ---- revert ---------------------------------------------------------------------------

    async def revert(self, volume_id: str, snapshot_id: str) -> None:
        """Throw away what was written since the newest snapshot (detached volumes)."""
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        volumes = self.volumes
        async with volumes.locks.volume(volume_id):
            _meta, users = await volumes.observe(volume_id)
            users.refuse_live("revert", volume_id)
            meta = volumes.require_available(volume_id)
            files = volumes.files_of(meta)
            chain_map, chain = volumes.validated_chain(files, meta)
            if sid not in chain_map.snapshots:
                raise NotFound(f"snapshot {sid} of volume {volume_id} does not exist")
            if chain_map.snapshots[sid] != chain_map.active:
                raise InvalidState(f"snapshot {sid} is not the newest snapshot of volume "
                                   f"{volume_id}; delete the newer snapshots first")
            overlay, backing = chain[0], chain[1]
            meta = volumes.record(files, meta.evolve(operation={
                "name": "revert", "snapshot": sid, "step": "replace"}))
            crash.point("revert:intent")
            target = files.directory / overlay.name
            tmp = temp_name(target)
            try:
                await qemuimg.create(tmp, "qcow2", meta.size, backing=backing.name,
                                     backing_fmt=layer_format(backing))
                os.chmod(tmp, volumes.file_mode)
                await asyncio.to_thread(fsync_file, tmp)
                crash.point("revert:overlay")
                os.replace(tmp, target)
                await asyncio.to_thread(fsync_dir, files.directory)
                crash.point("revert:replaced")
            finally:
                tmp.unlink(missing_ok=True)
                volumes.record(files, meta.evolve(operation=None))
            log.info("reverted volume %s to snapshot %s", volume_id, sid,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})

    async def _recover_revert(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        # temp files are already gone; the overlay is either the old one or the new empty one
        self.volumes.record(files, meta.evolve(operation=None))

    # ---- new volumes from a chain ----------------------------------------------------------

    async def clone(self, volume_id: str, **options: Any) -> VolumeMeta:
        """A new standalone volume with the current content; leaves no snapshot behind."""
        volume_id = valid_id(volume_id, "volume id")
        async with self.volumes.locks.volume(volume_id):
            await self.volumes.observe(volume_id)
            meta = self.volumes.require_idle(volume_id)
            files = self.volumes.files_of(meta)
            chain_map, chain = self.volumes.validated_chain(files, meta)
            if meta.state == "in-use":  # from a temporary point in time, guest running
                live = self.volumes.require_live()
                async with live.point_in_time(meta, files, chain_map, chain) as frozen:
                    return await self._copy_out(files, frozen, meta.size, "clone", options)
            return await self._copy_out(files, chain[0], meta.size, "clone", options)

    async def create_from_snapshot(self, volume_id: str, snapshot_id: str,
                                   **options: Any) -> VolumeMeta:
        """A new standalone volume holding the snapshot's point in time."""
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        async with self.volumes.locks.volume(volume_id):
            await self.volumes.observe(volume_id)
            meta = self.volumes.require_available(volume_id)
            files = self.volumes.files_of(meta)
            chain_map, chain = self.volumes.validated_chain(files, meta)
            source = snapshot_data(chain, chain_map, sid)
            info = await qemuimg.info(files.directory / source.name, layer_format(source),
                                      self.volumes.limits)
            return await self._copy_out(files, source, info.virtual_size,
                                        "create-from-snapshot", options)

    async def _copy_out(self, files: VolumeFiles, source: Layer, source_size: int,
                        operation: str, options: dict[str, Any]) -> VolumeMeta:
        request: CopyVolume = CopyVolume.parse(**options)
        size = request.size or source_size
        if size < source_size:
            raise InvalidArgument(f"size {size} is smaller than the {source_size} bytes of the "
                                  "source")
        fmt: Format = request.format or (
            "qcow2" if self.volumes.config.volumes.qcow2_volumes else "raw")
        src_path = files.directory / source.name

        async def make(path: Path) -> None:
            limits = self.volumes.limits
            await qemuimg.convert(src_path, layer_format(source), path, fmt, limits=limits)
            if size > source_size:
                await qemuimg.resize(path, fmt, size, limits=limits)
            await asyncio.to_thread(fsync_file, path)

        return await self.volumes.create_new(request.id or new_id(), size, fmt, True,
                                             request.share, make, operation=operation)

    # ---- health and repair ------------------------------------------------------------------

    def check(self, volume_id: str) -> list[str]:
        """Every difference between the info file, the chain and the files present, recorded
        on the volume as its health problems (empty: healthy)."""
        meta = self.volumes.get_volume(volume_id)
        files = self.volumes.files_of(meta)
        present = {path.name for path in files.existing() if files.is_image(path.name)}
        try:
            chain_map = read_info(files)
            fmt = meta.format if chain_map.active == files.base_name else "qcow2"
            chain = validate_chain(files, chain_map.active, fmt)
            problems = chain_problems(files, chain, chain_map, present)
        except InfoFileDamaged as exc:
            problems = [exc.message]
        except FileNotFoundError as exc:
            problems = [f"{Path(str(exc.filename)).name}, a file of the chain, is missing"]
        if problems != meta.problems:
            self.volumes.record(files, meta.evolve(problems=problems))
        return problems

    async def repair(self, volume_id: str, fmt: Format | None = None,
                     choice: str | None = None) -> list[str]:
        """Make the info file describe the chain the files form, losing no data still
        present. ``fmt``: the operator confirms the base file's format (needed when the
        volume was adopted without a trusted format record). An undecided pivot is shown,
        and settled only by the operator's ``choice`` (``base`` or ``overlay``). Returns
        what was done."""
        volume_id = valid_id(volume_id, "volume id")
        volumes = self.volumes
        async with volumes.locks.volume(volume_id):
            meta, users = await volumes.observe(volume_id)
            users.refuse_live("repair", volume_id)
            files = volumes.files_of(meta)
            if (meta.operation or {}).get("step") == AMBIGUOUS_PIVOT:
                deleter = volumes.require_live().deleter
                if choice is None:
                    raise NeedsRepair(await deleter.describe_ambiguity(files, meta))
                return [await deleter.resolve_ambiguity(files, meta, choice)]
            if choice is not None:
                raise InvalidArgument(f"volume {volume_id} has no undecided pivot to choose "
                                      "for; repair it without a choice")
            done = []
            if meta.operation is not None and record_problems(files, meta.operation,
                                                              meta.active):
                # a record naming foreign files is never acted on; the chain on disk is
                # rebuilt from the image headers below, as for any other damage
                meta = meta.evolve(operation=None)
                done.append("discarded the untrusted operation record of the metadata file")
            if meta.state != "available" or meta.operation is not None:
                raise InvalidState(f"volume {volume_id} is busy; repair needs an idle volume")
            unconfirmed = [p for p in meta.problems if p.startswith(FORMAT_UNCONFIRMED)]
            if fmt is not None:
                meta, line = self._confirm_format(files, meta, fmt)
                done.append(line)
            elif unconfirmed:
                raise NeedsRepair(f"{unconfirmed[0]} (nothing was changed)")
            return done + self._repair(files, meta)  # header reads only: quick, on the loop

    def _confirm_format(self, files: VolumeFiles, meta: VolumeMeta,
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

    def _repair(self, files: VolumeFiles, meta: VolumeMeta) -> list[str]:
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
            old_map: SnapshotMap | None = read_info(files)
        except InfoFileDamaged:
            old_map = None
        if old_map != new_map:
            write_info(files, new_map, self.volumes.file_mode)
            done.append(f"info file rewritten: active {new_map.active}, "
                        f"{len(new_map.snapshots)} snapshots")
        for name in strays:
            unlink_durable(files.directory / name)
            done.append(f"removed {name} (it held no data)")
        snapshots = {}
        for sid, overlay in new_map.snapshots.items():
            snapshots[sid] = meta.snapshots.get(sid) or {
                "created": file_mtime(files.directory / overlay), "quiesced": False}
        self.volumes.record(files, meta.evolve(active=new_map.active, snapshots=snapshots,
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

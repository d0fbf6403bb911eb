"""The D-Bus API (SPEC section 9): the registry of exported objects.

:class:`Api` exports the Manager, Share, Volume, Snapshot and Job objects (one module per
interface: :mod:`.manager`, :mod:`.share`, :mod:`.volume`, :mod:`.snapshot`, :mod:`.job`)
and keeps them in step with the services: after every change the affected objects are
exported, unexported or announce their changed properties, so clients never poll.
Property getters read cached state only (``GetManagedObjects`` calls every getter of
every object). Long operations return a Job object at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold.core.errors import AlreadyExists, NotFound
from hostvold.core.groups import collect_groups, groups_of
from hostvold.core.records import VolumeMeta
from hostvold.ops.changes import ChangeExports
from hostvold.ops.jobs import Job, JobRunner
from hostvold.ops.operations import Operations
from hostvold.ops.store import VolumeStore
from hostvold.server.authority import Authorizer
from hostvold.server.bus import (
    ERROR_PREFIX,
    ROOT_PATH,
    object_path,
    parse_path,
)
from hostvold.server.calls import Accepted, read_options
from hostvold.server.group import GroupSnapshotInterface
from hostvold.server.job import JobInterface
from hostvold.server.managed import managed_objects
from hostvold.server.manager import ManagerInterface
from hostvold.server.share import ShareInterface
from hostvold.server.snapshot import SnapshotInterface
from hostvold.server.volume import VolumeInterface

USAGE_DELAY = 0.2  # seconds a burst of changes has to end before the shares are measured


class Api:
    """Owns the exported objects and keeps them in step with the services."""

    def __init__(self, bus: MessageBus, store: VolumeStore, ops: Operations,
                 jobs: JobRunner, authorizer: Authorizer) -> None:
        self.bus = bus
        self.store = store
        self.ops = ops
        self.jobs = jobs
        self.authorizer = authorizer
        self.started = time.monotonic()
        self.changes = ChangeExports(ops, store.config.daemon.state_dir / "exports")
        self.manager = ManagerInterface(self)
        self.share_objects: dict[str, ShareInterface] = {}
        self.volume_objects: dict[str, VolumeInterface] = {}
        self.snapshot_objects: dict[str, SnapshotInterface] = {}
        self.group_objects: dict[str, GroupSnapshotInterface] = {}
        self._group_volumes: dict[str, set[str]] = {}  # group id -> volumes that name it
        self.job_objects: dict[str, JobInterface] = {}
        self._usage_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        store.change_listeners.append(self.sync_volume)
        bus.add_message_handler(self._unknown_object)
        bus.add_message_handler(managed_objects(bus))
        jobs.on_added.append(self._job_added)
        jobs.on_removed.append(self._job_removed)
        jobs.listeners.append(self._job_changed)

    def _unknown_object(self, message: Message) -> Message | None:
        """A call of one of our methods, or a property read, on an object that does not
        exist: NotFound naming it (not dbus-fast's UnknownMethod or "no interfaces")."""
        interface = message.interface or ""
        if (message.message_type != MessageType.METHOD_CALL or message.path == ROOT_PATH
                or not (interface.startswith("org.hostvold1.") or (
                    interface == "org.freedesktop.DBus.Properties"
                    and (message.path or "").startswith(ROOT_PATH + "/")))):
            return None
        kinds: dict[str, dict[str, Any]] = {
            "shares": self.share_objects, "volumes": self.volume_objects,
            "snapshots": self.snapshot_objects, "jobs": self.job_objects,
            "groups": self.group_objects}
        kind, object_id = parse_path(message.path or "") or ("", "")
        if object_id in kinds.get(kind, {}):
            return None
        what = f"{kind[:-1]} {object_id}" if kind in kinds else f"object {message.path}"
        return Message.new_error(message, f"{ERROR_PREFIX}NotFound",
                                 f"{what} does not exist (or is gone)")

    async def admit_new_volume(self, action: str, options: dict[str, Variant],
                               accepted: Accepted, parse: Callable[..., Any],
                               ) -> tuple[dict[str, Any], Any]:
        """A call that makes a new volume, checked when it arrives: the caller may change
        volumes, the options are of their types and make a valid request (``parse``), the
        id is free and the share configured. The options' values and the request."""
        await self.authorizer.require_admin(action)
        values = read_options(options, accepted)
        request = parse(**values)
        self.check_new_volume(request.id, request.share)
        return values, request

    def check_new_volume(self, volume_id: str | None, share: str | None) -> None:
        """What can be known about a new volume when the call arrives."""
        if volume_id is not None and self.store.find(volume_id) is not None:
            raise AlreadyExists(f"volume {volume_id} already exists")
        if share is not None and not any(share in (s.id, s.spec.address)
                                         for s in self.store.shares):
            raise NotFound(f"share {share!r} is not configured")

    def export_all(self) -> None:
        self.bus.export(ROOT_PATH, self.manager)
        for share in self.store.shares:
            interface = ShareInterface(self, share)
            self.share_objects[share.id] = interface
            self.bus.export(object_path("shares", share.id), interface)
        for meta in self.store.list_volumes():
            self.sync_volume(meta.id)
        self._share_usage_changed()  # the first figures, measured off the loop

    # ---- keeping objects in step -------------------------------------------------------

    def sync_volume(self, volume_id: str) -> None:
        """Export, update or unexport one volume, its snapshots and their groups."""
        meta = self.store.find(volume_id)
        current = self.volume_objects.get(volume_id)
        self._sync_groups(volume_id, groups_of(current.meta if current else None),
                          groups_of(meta))
        if meta is None:
            if current is not None:
                for sid in list(current.meta.snapshots):
                    self._drop_snapshot(sid)
                self.bus.unexport(object_path("volumes", volume_id))
                del self.volume_objects[volume_id]
            self._share_usage_changed()
            return
        exported = set(current.meta.snapshots) if current is not None else set()
        if current is None:
            current = VolumeInterface(self, meta)
            self.volume_objects[volume_id] = current
            self.bus.export(object_path("volumes", volume_id), current)
        else:
            current.update(meta)
        for sid in exported - set(meta.snapshots):
            self._drop_snapshot(sid)
        for sid in meta.snapshots:
            snap = self.snapshot_objects.get(sid)
            if snap is None:
                snap = SnapshotInterface(self, volume_id, sid)
                self.snapshot_objects[sid] = snap
                self.bus.export(object_path("snapshots", sid), snap)
            else:  # its properties read the volume's record: marshalled again when asked
                snap.managed_entry = None
        self._share_usage_changed()

    def _sync_groups(self, volume_id: str, before: set[str], after: set[str]) -> None:
        """The groups whose members' records changed, rebuilt from those records; a group
        shows while any member names it (one being deleted, with that problem)."""
        for group_id in before | after:
            volumes = self._group_volumes.setdefault(group_id, set())
            if group_id in after:
                volumes.add(volume_id)
            else:
                volumes.discard(volume_id)
            records = [m for v in volumes if (m := self.store.find(v)) is not None]
            view = collect_groups(records).get(group_id)
            current = self.group_objects.get(group_id)
            if view is None:
                if not volumes:
                    del self._group_volumes[group_id]
                if current is not None:
                    del self.group_objects[group_id]
                    self.bus.unexport(object_path("groups", group_id))
            elif current is None:
                self.group_objects[group_id] = GroupSnapshotInterface(self, view)
                self.bus.export(object_path("groups", group_id), self.group_objects[group_id])
            else:
                current.update(view)

    def _drop_snapshot(self, sid: str) -> None:
        if self.snapshot_objects.pop(sid, None) is not None:
            self.bus.unexport(object_path("snapshots", sid))

    def _share_usage_changed(self) -> None:
        """Re-measure the shares once, soon: one scan of each share for a burst of
        changes, not one per change (a share may hold thousands of volumes)."""
        if self._usage_pending:
            return
        self._usage_pending = True

        async def refresh() -> None:
            await asyncio.sleep(USAGE_DELAY)  # the burst's end, not a poll
            self._usage_pending = False
            await asyncio.gather(*(share.refresh() for share in self.share_objects.values()))

        task = asyncio.get_running_loop().create_task(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _job_added(self, job: Job) -> None:
        interface = JobInterface(self, job)
        self.job_objects[job.id] = interface
        self.bus.export(object_path("jobs", job.id), interface)

    def _job_removed(self, job: Job) -> None:
        if self.job_objects.pop(job.id, None) is not None:
            self.bus.unexport(object_path("jobs", job.id))

    def _job_changed(self, job: Job, names: set[str]) -> None:
        interface = self.job_objects.get(job.id)
        if interface is None:
            return
        if job.state != "running":
            for path in job.objects:  # the objects the job touched are up to date first
                kind, object_id = parse_path(path) or ("", "")
                if kind == "volumes":
                    self.sync_volume(object_id)
        interface.announce(names)

    # ---- what the objects ask of the registry ------------------------------------------

    def start_job(self, operation: str, objects: list[str], work: Callable[[], Awaitable[Any]],
                  bytes_total: int = 0) -> str:
        job = self.jobs.start(operation, objects, work, bytes_total)
        return object_path("jobs", job.id)

    def start_volume_job(self, operation: str, sources: list[str],
                         make: Callable[[], Awaitable[VolumeMeta]], bytes_total: int) -> str:
        """A job that makes a new volume; the new volume's path joins the job's objects
        (after ``sources``) when the job ends."""
        objects = list(sources)

        async def work() -> VolumeMeta:
            meta = await make()
            self.sync_volume(meta.id)
            objects.append(object_path("volumes", meta.id))
            return meta

        return self.start_job(operation, objects, work, bytes_total)

    def coordination_state(self) -> str:
        """``single-host``, or the cluster backend and whether this host's session holds."""
        coordination = self.ops.coordination
        if coordination is None:
            return "single-host"
        state = "member" if coordination.healthy else "fenced (no session)"
        return f"{coordination.url.split('?')[0]}: {state}"

    def health(self) -> str:
        down = [s.spec.address for s in self.store.shares if not s.usable]
        sick = [m.id for m in self.store.list_volumes() if m.problems]
        if not down and not sick:
            return "ok"
        parts = []
        if down:
            parts.append(f"{len(down)} share(s) unavailable")
        if sick:
            parts.append(f"{len(sick)} volume(s) need a repair")
        return "degraded: " + ", ".join(parts)


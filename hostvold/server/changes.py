"""``Volume.ExportChanges``: the blocks changed between two points in time, as an NBD
connection handed to the caller plus the extent map (SPEC section 5b)."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from dbus_fast import Variant
from dbus_fast.annotations import DBusDict, DBusSignature, DBusStr
from dbus_fast.service import dbus_method

from hostvold.core.ids import valid_id
from hostvold.ops.changes import Export
from hostvold.server.bus import object_path
from hostvold.server.calls import named_errors, read_options
from hostvold.storage.changeview import CONTEXT

if TYPE_CHECKING:
    from hostvold.core.records import VolumeMeta
    from hostvold.server.api import Api

ExportReply = Annotated[list[Any], DBusSignature("ha(ttbb)a{sv}")]
CHANGES_OPTIONS = {"full-if-needed": frozenset("b")}


class VolumeChanges:
    """Mixed into the Volume interface."""

    api: "Api"
    meta: "VolumeMeta"

    @dbus_method()
    @named_errors
    async def ExportChanges(self, since: DBusStr, to: DBusStr,
                            options: DBusDict) -> ExportReply:
        """``since``: a snapshot id, or "" for everything; ``to``: a snapshot id, or "" for
        now. Returns a connected NBD socket serving ``to`` read-only with the context
        ``qemu:dirty-bitmap:hostvold-changes``, the extents ``(start, length, dirty,
        zero)``, and what was exported (``from``, ``fallback``, ``size``, ``changed``,
        ``job``: it holds the volume until the connection closes)."""
        await self.api.authorizer.require_admin("Volume.ExportChanges")
        values = read_options(options, CHANGES_OPTIONS)
        since_id = valid_id(since, "snapshot id (from)") if since else None
        to_id = valid_id(to, "snapshot id (to)") if to else None
        self.api.store.require_idle(self.meta.id)
        ready: asyncio.Future[Export] = asyncio.get_running_loop().create_future()
        volume_id, exports = self.meta.id, self.api.changes

        async def work() -> int:
            try:
                return await exports.export(volume_id, since_id, to_id,
                                            bool(values.get("full-if-needed")), ready)
            except Exception as exc:  # the caller hears it, not only the job
                if not ready.done():
                    ready.set_exception(exc)
                raise
            finally:
                if not ready.done():
                    ready.cancel()

        path = object_path("volumes", volume_id)
        job = self.api.jobs.start("export-changes", [path], work, self.meta.size)
        export = await ready
        span = export.span
        info = {
            "from": Variant("s", span.since or ""), "fallback": Variant("b", span.fallback),
            "size": Variant("t", export.size), "context": Variant("s", CONTEXT),
            "changed": Variant("t", sum(r.length for r in export.runs if r.dirty)),
            "job": Variant("o", object_path("jobs", job.id)),
        }
        # the fd is the caller's: the bus closes this copy once the reply is written
        return [export.fd, [(r.start, r.length, r.dirty, r.zero) for r in export.runs], info]

"""``org.hostvold1.Job`` at ``/org/hostvold1/jobs/<id>``: one long operation, its progress
and its end. Changes are announced (PropertiesChanged, and Completed once at the end) when
the job runner reports them; the getters read the job record only."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
from typing import TYPE_CHECKING, Annotated

from dbus_fast import PropertyAccess
from dbus_fast.annotations import DBusDouble, DBusSignature, DBusStr, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from hostvold.ops.jobs import Job
from hostvold.server.bus import ERROR_PREFIX
from hostvold.server.calls import ObjectPaths, Pair, named_errors

if TYPE_CHECKING:
    from hostvold.server.api import Api


def _microseconds(seconds: float) -> int:
    return int(seconds * 1_000_000)


class JobInterface(ServiceInterface):
    def __init__(self, api: "Api", job: Job) -> None:
        super().__init__("org.hostvold1.Job")
        self.api = api
        self.job = job

    def announce(self, names: set[str]) -> None:
        """Emit the changed properties named; Completed when the job's state has left
        ``running``."""
        job = self.job
        values = {
            "State": job.state, "Progress": job.fraction,
            "BytesDone": job.bytes_done, "Rate": job.rate,
            "ExpectedEndTime": _microseconds(job.expected_end),
            "Error": self.Error,
            "Objects": list(job.objects),
            "CompletedTimestamp": _microseconds(job.completed),
            "CompletedTimestampMonotonic": _microseconds(job.completed_monotonic),
        }
        self.emit_properties_changed({k: v for k, v in values.items() if k in names})
        if job.state != "running" and "State" in names:
            error_name, message = self.Error
            self.Completed(job.succeeded, error_name, message)

    @dbus_method()
    @named_errors
    async def Cancel(self) -> None:
        await self.api.authorizer.require_admin(f"Job.Cancel {self.job.operation}")
        self.api.jobs.cancel(self.job.id)

    @dbus_signal()
    def Completed(self, success: bool, error_name: str,
                  message: str) -> Annotated[tuple[bool, str, str], DBusSignature("bss")]:
        return (success, error_name, message)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.job.id

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> DBusStr:
        return self.job.operation

    @dbus_property(access=PropertyAccess.READ)
    def Objects(self) -> ObjectPaths:
        return list(self.job.objects)

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.job.state

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> DBusDouble:
        return self.job.fraction

    @dbus_property(access=PropertyAccess.READ)
    def BytesDone(self) -> DBusUInt64:
        return self.job.bytes_done

    @dbus_property(access=PropertyAccess.READ)
    def BytesTotal(self) -> DBusUInt64:
        return self.job.bytes_total

    @dbus_property(access=PropertyAccess.READ)
    def Rate(self) -> DBusDouble:
        return self.job.rate

    @dbus_property(access=PropertyAccess.READ)
    def ExpectedEndTime(self) -> DBusUInt64:
        """Unix time in microseconds (0: unknown)."""
        return _microseconds(self.job.expected_end)

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> Pair:
        name = f"{ERROR_PREFIX}{self.job.error_name}" if self.job.error_name else ""
        return (name, self.job.error_message)

    @dbus_property(access=PropertyAccess.READ)
    def CompletedTimestamp(self) -> DBusUInt64:
        return _microseconds(self.job.completed)

    @dbus_property(access=PropertyAccess.READ)
    def CompletedTimestampMonotonic(self) -> DBusUInt64:
        return _microseconds(self.job.completed_monotonic)

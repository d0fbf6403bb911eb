"""What a D-Bus interface object may ask of the registry that exports it.

The registry (:mod:`hostvold.server.objects`) imports every interface module to export
their objects; the interfaces depend on this small protocol instead, never on the registry,
so the imports run one way (checked by the import contracts in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from dbus_fast import Variant

from hostvold.core.records import VolumeMeta
from hostvold.ops.changes import ChangeExports
from hostvold.ops.jobs import JobRunner
from hostvold.ops.operations import Operations
from hostvold.ops.store import VolumeStore
from hostvold.server.authority import Authorizer
from hostvold.server.calls import Accepted


class Api(Protocol):
    @property
    def store(self) -> VolumeStore: ...
    @property
    def ops(self) -> Operations: ...
    @property
    def jobs(self) -> JobRunner: ...
    @property
    def authorizer(self) -> Authorizer: ...
    @property
    def changes(self) -> ChangeExports: ...
    @property
    def started(self) -> float: ...
    @property
    def volume_objects(self) -> Mapping[str, object]: ...
    @property
    def snapshot_objects(self) -> Mapping[str, object]: ...
    @property
    def share_objects(self) -> Mapping[str, object]: ...

    async def admit_new_volume(self, action: str, options: dict[str, Variant],
                               accepted: Accepted, parse: Callable[..., Any],
                               ) -> tuple[dict[str, Any], Any]:
        """The checks of a call that makes a new volume; its options' values and request."""

    def check_new_volume(self, volume_id: str | None, share: str | None) -> None: ...

    def sync_volume(self, volume_id: str) -> None:
        """Export, update or unexport one volume's objects after a change."""

    def start_job(self, operation: str, objects: list[str],
                  work: Callable[[], Awaitable[Any]], bytes_total: int = 0) -> str:
        """A job running ``work``; its object path."""

    def start_volume_job(self, operation: str, sources: list[str],
                         make: Callable[[], Awaitable[VolumeMeta]], bytes_total: int) -> str:
        """A job that makes a new volume; its object path."""

    def coordination_state(self) -> str: ...

    def health(self) -> str: ...

"""Space on a share: measured in the share's own pool, and checked before data moves."""

from __future__ import annotations

import os
from collections.abc import Iterable

from hostvold.core.errors import NoSpace
from hostvold.core.layout import Naming
from hostvold.core.records import VolumeMeta
from hostvold.core.shares import Capacity
from hostvold.storage.mounts import Share
from hostvold.storage.volumefiles import measure_directory


async def measure(share: Share, naming: Naming, volumes: Iterable[VolumeMeta]) -> Capacity:
    """Capacity and usage of one share: a scan of its directory, in its own pool; the
    provisioned sizes come from the records of ``volumes``."""
    total, free, allocated = await share.io.run(measure_directory, share.require(), naming)
    provisioned = sum(m.size for m in volumes if m.share == share.spec.address)
    return Capacity(total, free, allocated, provisioned)


async def require_space(share: Share, needed: int, what: str) -> None:
    """Refuse, before anything is written, work that needs more than the free space."""
    st = await share.io.run(os.statvfs, share.require())
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpace(f"{what} needs up to {needed} bytes on share {share.spec.address}, "
                      f"which has {free} free; nothing was changed")

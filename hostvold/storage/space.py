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


async def measure(share: Share, naming: Naming, volumes: Iterable[VolumeMeta],
                  rescan: bool = True) -> Capacity:
    """Capacity and usage of one share, in its own pool; the provisioned sizes come from
    the records of ``volumes``. The allocated bytes need a scan of the share's directory:
    ``rescan=False`` takes the last scan's figure (kept on the share, refreshed after each
    burst of changes) and reads only the filesystem's counters, so that placing a new
    volume costs the same with ten volumes or ten thousand."""
    if rescan or share.allocated is None:
        total, free, allocated = await share.io.run(measure_directory, share.require(), naming)
        share.allocated = allocated
    else:
        allocated = share.allocated
        st = await share.io.run(os.statvfs, share.require())
        total, free = st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail
    provisioned = sum(m.size for m in volumes if m.share == share.spec.address)
    return Capacity(total, free, allocated, provisioned)


async def require_space(share: Share, needed: int, what: str) -> None:
    """Refuse, before anything is written, work that needs more than the free space."""
    st = await share.io.run(os.statvfs, share.require())
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpace(f"{what} needs up to {needed} bytes on share {share.spec.address}, "
                      f"which has {free} free; nothing was changed")

"""Pausing Python's cyclic garbage collector around one large, acyclic build.

Every collection of the oldest generation walks every object the process holds; a D-Bus
answer for ten thousand volumes makes hundreds of thousands of new objects, so collections
triggered while it is built (by the daemon) or decoded (by a client) make the time grow
faster than the number of volumes (SPEC 15, P6). Nothing built there forms a cycle, so
reference counting frees it all the same.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

"""Mounting shares and measuring them: the filesystem edge of :mod:`hostvold.core.shares`."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hostvold.core.backoff import backoff
from hostvold.core.errors import NotFound, StorageUnavailable
from hostvold.core.shares import Capacity, ShareSpec
from hostvold.storage.shareio import ShareIO

log = logging.getLogger(__name__)

RETRY_DELAY = 1.0  # seconds before the first retry of a mount (then longer)


@dataclass(eq=False)
class Share:
    """A configured share on this host: its mount, the state of the network path to its
    host (SPEC section 10: ``up``, ``unreachable``, ``local``; ``unknown`` until looked
    up), whether it answers, and the pool its file calls run in."""

    spec: ShareSpec
    mount_point: Path
    mounted: bool = False
    error: str | None = None
    timeout: float = 10.0  # seconds a file call may take before the share counts as hung
    path: str = "unknown"
    path_detail: str = ""
    hung: str | None = None  # why it counts as not answering, until a stuck call returns
    allocated: int | None = None  # bytes of volume images, as the last scan found
    listeners: list[Callable[[Share], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.spec.host is None:
            self.path = "local"
        self.io = ShareIO(self.spec.address, self.require_reachable, self.mark_hung,
                          self.answered, self.timeout)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def reachable(self) -> bool:
        return self.path != "unreachable" and self.hung is None

    @property
    def usable(self) -> bool:
        return self.mounted and self.reachable

    def tally(self, change: int) -> None:
        """Volume images of ``change`` bytes made (or, negative, removed) since the scan."""
        if self.allocated is not None:
            self.allocated = max(self.allocated + change, 0)

    def require_reachable(self) -> None:
        """Refuse at once, without touching the share, when it cannot answer."""
        if self.path == "unreachable":
            raise StorageUnavailable(f"share {self.spec.address} is unreachable: "
                                     f"{self.path_detail or 'its network path is down'}")
        if self.hung is not None:
            raise StorageUnavailable(f"share {self.spec.address} does not answer: {self.hung}")

    def require(self) -> Path:
        """The mount point, or StorageUnavailable if the share cannot be used now."""
        self.require_reachable()
        if not self.mounted:
            raise StorageUnavailable(
                f"share {self.spec.address} is not mounted: {self.error or 'unknown reason'}")
        return self.mount_point

    def set_path(self, state: str, detail: str) -> None:
        if (state, detail) == (self.path, self.path_detail):
            return
        before, self.path, self.path_detail = self.path, state, detail
        log_at = logging.ERROR if state == "unreachable" else logging.INFO
        log.log(log_at, "share %s: storage path %s -> %s (%s)", self.spec.address, before,
                state, detail)
        self._tell()

    def mark_hung(self, reason: str) -> None:
        if self.hung is None:
            self.hung = reason
            log.error("share %s: %s; its volumes are refused until it answers",
                      self.spec.address, reason)
            self._tell()

    def answered(self) -> None:
        """A call that had timed out returned after all: the share answers again."""
        if self.hung is not None:
            self.hung = None
            log.warning("share %s answers again", self.spec.address)
            self._tell()

    def _tell(self) -> None:
        for listener in self.listeners:
            try:
                listener(self)
            except Exception:
                log.exception("share listener failed")


def find_share(shares: list[Share], address: str) -> Share:
    for share in shares:
        if share.spec.address == address:
            return share
    raise NotFound(f"share {address} is not configured")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> set[Path]:
    """Every mount point of this mount namespace."""
    points = set()
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(Path(_unescape(fields[4])))
    return points


async def _run_mount(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, LC_ALL="C"))
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


async def ensure_mounted(share: Share, attempts: int) -> Share:
    """Mount ``share`` unless it already is; retry, then record the failure on the share."""
    if share.spec.local_dir:
        share.mount_point.mkdir(parents=True, exist_ok=True, mode=0o755)
        share.mounted, share.error = True, None
        return share
    if share.mount_point in mounted_points():
        log.info("share %s already mounted at %s", share.spec.address, share.mount_point)
        share.mounted, share.error = True, None
        return share
    share.mount_point.mkdir(parents=True, exist_ok=True, mode=0o755)
    argv = ["mount", "-t", share.spec.fstype]
    if share.spec.options:
        argv += ["-o", share.spec.options]
    argv += [share.spec.address, str(share.mount_point)]
    error = ""
    pauses = backoff(RETRY_DELAY, 8 * RETRY_DELAY)
    for attempt in range(1, attempts + 1):
        code, error = await _run_mount(argv)
        if code == 0 or share.mount_point in mounted_points():
            log.info("mounted %s at %s", share.spec.address, share.mount_point)
            share.mounted, share.error = True, None
            return share
        log.warning("mount of %s failed (attempt %d of %d): %s",
                    share.spec.address, attempt, attempts, error)
        if attempt < attempts:
            await asyncio.sleep(next(pauses))
    share.mounted, share.error = False, f"mount failed after {attempts} attempts: {error}"
    return share


async def unmount(share: Share) -> None:
    if share.spec.local_dir or share.mount_point not in mounted_points():
        return
    code, error = await _run_mount(["umount", str(share.mount_point)])
    if code != 0:
        raise StorageUnavailable(f"umount of {share.mount_point} failed: {error}")
    share.mounted = False


def filesystem_capacity(mount_point: Path) -> tuple[int, int]:
    """(total, free) bytes of the filesystem at ``mount_point``, as unprivileged users see it."""
    st = os.statvfs(mount_point)
    return st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail


def capacity(share: Share, allocated: int, provisioned: int) -> Capacity:
    total, free = filesystem_capacity(share.require())
    return Capacity(total=total, free=free, allocated=allocated, provisioned=provisioned)

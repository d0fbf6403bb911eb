"""Mounting shares and measuring them: the filesystem edge of :mod:`hostvold.core.shares`."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hostvold.core.backoff import backoff
from hostvold.core.errors import StorageUnavailable
from hostvold.core.shares import Capacity, ShareSpec

log = logging.getLogger(__name__)

RETRY_DELAY = 1.0  # seconds before the first retry of a mount (then longer)


@dataclass
class Share:
    """A configured share on this host and what we know of its mount."""

    spec: ShareSpec
    mount_point: Path
    mounted: bool = False
    error: str | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def require(self) -> Path:
        """The mount point, or StorageUnavailable if the share cannot be used now."""
        if not self.mounted:
            raise StorageUnavailable(
                f"share {self.spec.address} is not mounted: {self.error or 'unknown reason'}")
        return self.mount_point


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

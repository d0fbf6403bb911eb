"""The children that write a volume's files (qemu-img), held to this host's lease.

Many hosts: nothing this host started may write a volume after its lease could have
expired, or another host that took the volume over would meet a writer it cannot see. So
every child joins the process group of a small guard process (:mod:`fenceguard`), told
after each lease renewal until when the lease surely holds. When that moment passes with
no newer word (the daemon stopped, stalled, or cut off from etcd), or when the daemon dies,
the guard SIGKILLs its whole group. It runs in a process group of its own, so a SIGSTOP of
the daemon's group leaves it awake, and a stopped child dies of SIGKILL too.

Every child that writes a volume's files is also logged as a step (``STEP begin`` /
``STEP end``, with the host and the volume), and so is every metadata record an operation
writes (``STEP record``): from the logs of all hosts one can prove that no two hosts ever
changed one volume at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hostvold.steps")

# the subcommands that write the image they name last
WRITERS = frozenset({"create", "commit", "rebase", "resize", "convert", "amend", "snapshot",
                     "bitmap"})
_VOLUME = re.compile(r"volume-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class FenceGuard:
    """The guard process and the deadlines it keeps; one per daemon. Besides the lease's
    deadline it hears, several times per lease, that the daemon's event loop still runs:
    a daemon stalled or stopped for three quarters of a lease is killed too, before any
    other host may take its locks, so it never wakes up to finish a step it had begun
    (systemd starts it again, and it recovers from what is recorded)."""

    def __init__(self, host_id: str, check: Callable[[], None], lease_seconds: float) -> None:
        self.host_id = host_id
        self.check = check  # raises when this host may not start a writer now
        self.lease_seconds = lease_seconds
        self.proc: asyncio.subprocess.Process | None = None
        self._deadline = 0.0
        self._watch: asyncio.Task[None] | None = None
        self._alive: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, deadline: float) -> None:
        self._deadline = deadline
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hostvold.storage.fenceguard", self.host_id,
            stdin=asyncio.subprocess.PIPE, process_group=0)  # a group of its own
        self.extend(deadline)
        self._watch = asyncio.get_running_loop().create_task(self._restart_when_gone())

    def watch_daemon(self) -> None:
        """From now on (the daemon is ready: no long start-up work left on its loop), the
        guard kills the daemon when its loop stops running."""
        if self._alive is None:
            self._alive = asyncio.get_running_loop().create_task(self._say_alive())

    async def _say_alive(self) -> None:
        """The event loop runs: the guard's watchdog, renewed every eighth of a lease."""
        while True:
            self._send(f"alive {time.monotonic() + self.lease_seconds * 0.75:.6f}")
            await asyncio.sleep(self.lease_seconds / 8)

    async def _restart_when_gone(self) -> None:
        assert self.proc is not None
        code: object = await self.proc.wait()
        while not self._stopping:  # nothing spawns until it is back (spawn_options refuses)
            log.error("the fence guard ended (status %s); starting it again", code)
            try:
                await self.start(self._deadline)
                return
            except OSError as exc:
                code = str(exc)
                await asyncio.sleep(1)

    def extend(self, deadline: float) -> None:
        """The lease holds until ``deadline`` (``time.monotonic()``, the guard's clock too)."""
        self._deadline = deadline
        self._send(f"lease {deadline:.6f}")

    def _send(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(f"{line}\n".encode())

    def spawn_options(self) -> dict[str, Any]:
        """Where a new writer goes: into the guard's group, if this host may write now and
        for a moment yet (a child started at the deadline could join after the guard's
        kill)."""
        self.check()
        if time.monotonic() > self._deadline - min(1.0, self.lease_seconds / 10):
            raise guard_refused("this host's lease is about to need a renewal")
        if self.proc is None or self.proc.returncode is not None:
            raise guard_refused("the fence guard is not running")
        return {"process_group": self.proc.pid}

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._watch, self._alive):
            if task is not None:
                task.cancel()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: the guard kills what is left and ends
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)


def guard_refused(why: str) -> Exception:
    from hostvold.storage.coordination import CoordinationUnavailable
    return CoordinationUnavailable(f"{why}; no qemu-img may start now, try again shortly")


_guard: FenceGuard | None = None
_host_id = "-"


def install(host_id: str, guard: FenceGuard | None) -> None:
    """This daemon's host id for the step log, and its guard (None: a single host)."""
    global _guard, _host_id
    _host_id, _guard = host_id, guard


def spawn_options() -> dict[str, Any]:
    return _guard.spawn_options() if _guard is not None else {}


def _volume_of(argv: list[str]) -> str | None:
    for arg in reversed(argv):
        found = _VOLUME.search(arg)
        if found:
            return found.group(1)
    return None


def _writer(argv: list[str]) -> tuple[str, str] | None:
    """(subcommand, volume id) of a qemu-img that writes a volume's files, else None."""
    words = [os.path.basename(a) for a in argv]
    if "qemu-img" not in words:
        return None
    subcommand = argv[words.index("qemu-img") + 1] if words.index("qemu-img") + 1 < len(
        argv) else ""
    volume = _volume_of(argv)
    return (subcommand, volume) if subcommand in WRITERS and volume else None


def started(pid: int, argv: list[str]) -> None:
    if (found := _writer(argv)) is not None:
        log.info("STEP begin t=%.6f host=%s volume=%s pid=%d what=%s", time.time(), _host_id,
                 found[1], pid, found[0])


def ended(pid: int, argv: list[str], returncode: int | None) -> None:
    if (found := _writer(argv)) is not None:
        log.info("STEP end t=%.6f host=%s volume=%s pid=%d rc=%s", time.time(), _host_id,
                 found[1], pid, returncode)


def recorded(volume_id: str, operation: dict[str, Any] | None) -> None:
    op = operation or {}
    log.info("STEP record t=%.6f host=%s volume=%s op=%s step=%s", time.time(), _host_id,
             volume_id, op.get("name") or "-", op.get("step") or "-")

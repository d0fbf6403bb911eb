"""The cluster edge: tooz over etcd (SPEC section 8), for hosts that mount the same shares.

One coordinator per daemon, its member id the host id. Per-volume locks
(``hostvold-volume-<id>``) are held for whole operations; the host is a member of the group
``hostvold-hosts`` while its heartbeat renews its lease. Every tooz call blocks, so each
runs in a small thread pool of its own, never on the event loop.

Fencing: when the heartbeat cannot renew the lease for half its length, this host counts as
cut off (``healthy`` false, ``on_lost`` told): it starts no data-changing step and its
running jobs stop at their next recoverable step, well before the lease expires and another
host may take its locks and its operations over. The same half-lease deadline goes to the
fence guard (:mod:`hostvold.storage.children`), which kills this host's qemu-img children
when it passes, whatever state the daemon is in. A host that was stalled finds out before
its next step: every step checks that the lease is fresh and that the lock it holds was
taken in the current session (a renewal that found the session expired starts a new one,
and the locks of the old one are void).

A host id is one live daemon: a daemon whose id is already a live member refuses to start,
unless that member is its own previous run (the incarnation it noted in its state
directory). A lock held by another host is answered at once with ``Busy``, naming the
holder and when its lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from etcd3gw import exceptions as etcd_errors
from etcd3gw.lease import Lease
from tooz import coordination

from hostvold.core.errors import ConfigError, StorageUnavailable
from hostvold.storage.atomic import write_atomic
from hostvold.storage.etcdwatch import PrefixWatch

log = logging.getLogger(__name__)

GROUP = b"hostvold-hosts"
CHANGES = "/hostvold/volumes/"  # one key per volume, bumped on every committed change
T = TypeVar("T")
# tooz wraps most failures in ToozError, but not all: its etcd driver lets the client's own
# errors (a refused or unreachable network: ConnectionFailedError) through from heartbeat
BACKEND_FAILURES = (coordination.ToozError, etcd_errors.Etcd3Exception, OSError)


class CoordinationUnavailable(StorageUnavailable):
    """The coordination backend cannot be reached, or this host lost its session: nothing
    that changes data may start. Reads go on."""

    name = "CoordinationUnavailable"


class DuplicateHostId(ConfigError):
    """Another live daemon already is this host id: two would silently diverge."""

    def __init__(self, message: str) -> None:  # one line for the operator, no field list
        Exception.__init__(self, message)


class Coordination:
    def __init__(self, url: str, host_id: str, lease_seconds: int,
                 state_dir: Path | None = None) -> None:
        sep = "&" if "?" in url else "?"
        self.url = (f"{url}{sep}timeout={lease_seconds}&lock_timeout={lease_seconds}"
                    f"&membership_timeout={lease_seconds}")
        self.host_id = host_id
        self.lease_seconds = lease_seconds
        self.incarnation_file = state_dir / "incarnation" if state_dir else None
        self.incarnation = str(uuid.uuid4())
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tooz")
        self.renewer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        self.coordinator: Any = None
        self.healthy = False
        self.joined = False
        self._lease_id = 0  # the session lease this host joined with
        self.epoch = 0  # bumped when the session expired: locks of older epochs are void
        self.on_lost: list[Callable[[], None]] = []
        self.on_renewed: list[Callable[[float], None]] = []  # told the new deadline
        self.on_back: list[Callable[[], None]] = []  # fenced, then back: catch up
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_renewal = 0.0
        self._watches: list[PrefixWatch] = []
        self._unannounced: set[str] = set()  # changes etcd did not take: sent again later
        self._resending: asyncio.Task[None] | None = None

    @property
    def deadline(self) -> float:
        """Until when (``time.monotonic()``) this host may act: half the lease after the
        last renewal was sent, well before another host may take its locks over."""
        return self._last_renewal + self.lease_seconds / 2

    @property
    def fresh(self) -> bool:
        return self.healthy and time.monotonic() < self.deadline

    async def call(self, function: Callable[..., T], *args: Any, renewer: bool = False) -> T:
        """``function(*args)`` in the coordination's own threads; a backend failure
        becomes CoordinationUnavailable."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.renewer if renewer else self.executor, function, *args)
        except BACKEND_FAILURES as exc:
            raise CoordinationUnavailable(
                f"the coordination backend at {self.url.split('?')[0]} failed "
                f"({str(exc) or type(exc).__name__}); changes are refused, reads go on") from None

    async def start(self) -> None:
        """Connect, join the hosts' group, and renew the lease from the event loop."""
        def connect() -> Any:
            coordinator = coordination.get_coordinator(self.url, self.host_id.encode())
            coordinator.start(start_heart=False)
            with contextlib.suppress(coordination.GroupAlreadyExist):
                coordinator.create_group(GROUP).get()
            return coordinator

        self._last_renewal = time.monotonic()
        self.coordinator = await self.call(connect)
        await self.call(self._join)
        if self.incarnation_file is not None:
            write_atomic(self.incarnation_file, self.incarnation.encode(), 0o600)
        self.healthy = True
        self._heartbeat = asyncio.get_running_loop().create_task(self._renew())
        log.info("member %s of %s at %s (lease %d s)", self.host_id, GROUP.decode(),
                 self.url.split("?")[0], self.lease_seconds)

    def _join(self) -> None:
        """Join as this host id, unless another live daemon is it already. A member left by
        this host's own previous run (its incarnation, noted in the state directory, of
        this very boot, its pid gone) is replaced at once. Any other member holding the
        id is waited out for one lease: a dead one's key goes, a live one renews it (a
        clone that copied our state directory, or our run before a quick reboot, differ
        by boot)."""
        capabilities = json.dumps({"incarnation": self.incarnation, "pid": os.getpid(),
                                   "boot": _boot_id(), "started": now_text()}).encode()
        try:
            self.coordinator.join_group(GROUP, capabilities).get()
            self._joined_with(session_lease(self.coordinator).id)
            return
        except coordination.MemberAlreadyExist:
            pass
        other = self._member_capabilities()
        previous = self._previous_incarnation()
        ours = (previous is not None and other.get("incarnation") == previous
                and other.get("boot") == _boot_id() and not _still_running(other.get("pid")))
        if not ours:
            with contextlib.suppress(*BACKEND_FAILURES):
                self.coordinator.client.watch_once(self._member_key(),
                                                   timeout=self.lease_seconds + 1)
            if not self.coordinator.client.get(self._member_key()):
                self.coordinator.join_group(GROUP, capabilities).get()
                self._joined_with(session_lease(self.coordinator).id)
                return
            ttl = self._member_ttl()
            raise DuplicateHostId(
                f"host id {self.host_id} is already a live member of {GROUP.decode()} at "
                f"{self.url.split('?')[0]} (another daemon, pid {other.get('pid', '?')}, "
                f"started {other.get('started', '?')}; its lease ends in {ttl} s unless it "
                "renews): give each host its own [coordination] host_id in hostvold.conf")
        log.warning("host %s: the member left by this host's previous run is replaced",
                    self.host_id)
        self.coordinator.client.delete(self._member_key())
        self.coordinator.join_group(GROUP, capabilities).get()
        self._joined_with(session_lease(self.coordinator).id)

    def _joined_with(self, lease_id: int) -> None:
        self._lease_id, self.joined = lease_id, True

    def _member_key(self) -> str:
        return f"tooz/groups/{GROUP.decode()}/{self.host_id}"

    def _member_capabilities(self) -> dict[str, Any]:
        try:
            found = self.coordinator.get_member_capabilities(GROUP, self.host_id.encode()).get()
            value = json.loads(found) if found else {}
        except (coordination.MemberNotJoined, ValueError, TypeError):
            value = {}
        return value if isinstance(value, dict) else {}

    def _member_ttl(self) -> int | str:
        found = self.coordinator.client.get(self._member_key(), metadata=True)
        lease = int(found[0][1].get("lease", 0)) if found else 0
        return lease_ttl(self.coordinator.client, lease) if lease else "?"

    def _previous_incarnation(self) -> str | None:
        if self.incarnation_file is None:
            return None
        try:
            return self.incarnation_file.read_text().strip()
        except OSError:
            return None

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.coordinator is not None:  # never the member key of another daemon
            with contextlib.suppress(Exception):
                await self.call(self._leave if self.joined else self.coordinator.stop)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.renewer.shutdown(wait=False, cancel_futures=True)

    def _leave(self) -> None:
        with contextlib.suppress(coordination.ToozError):
            self.coordinator.leave_group(GROUP).get()
        self.coordinator.stop()

    async def _renew(self) -> None:
        """Renew the lease a few times per lease. Half the lease after the last renewal was
        sent, a renewal that has not succeeded fences this host at that very moment: a try
        is cut short there, and after a failed try the next comes no later than that."""
        pause = max(self.lease_seconds / 6, 0.5)
        while True:
            fence_at = self._last_renewal + self.lease_seconds / 2
            if self.healthy:  # the lease's own clock: a renewal, not a poll
                await asyncio.sleep(max(min(pause, fence_at - time.monotonic()), 0))
            else:
                await asyncio.sleep(pause)
            sent = time.monotonic()  # etcd counts the lease from the request, not the reply
            wait = fence_at - sent if self.healthy else pause * 2
            try:  # a thread of its own: never queued behind lock waits
                kept = await asyncio.wait_for(self.call(self._heartbeat_once, renewer=True),
                                              max(wait, 0.05))
            except Exception as exc:  # whatever failed, the lease's clock decides
                overdue = time.monotonic() - self._last_renewal
                log.warning("lease renewal failed (%.1f s since the last): %s", overdue,
                            str(exc) or type(exc).__name__)
                if self.healthy and time.monotonic() >= fence_at:
                    self._fence()
                continue
            if not kept and not await self._new_session():
                continue
            # fenced, or past the deadline unfenced (a stalled loop whose renewal then
            # worked): steps were refused meanwhile, and their operations wait to be finished
            back = not self.healthy or sent >= fence_at
            self.healthy, self._last_renewal = True, sent
            for listener in self.on_renewed:
                listener(self.deadline)
            self._announce_again()
            if back:
                log.warning("coordination session of %s is back", self.host_id)
                for watch in self._watches:  # a stream cut off with us may be dead, silently
                    watch.restart()
                for come_back in self.on_back:
                    come_back()

    def _heartbeat_once(self) -> bool:
        """Renew the session's lease and each held lock's; False when the session is not
        the one this host joined with, or any of those leases had expired: the session is
        gone with every lock it held (tooz's own heartbeat hides it, making a new lease,
        which the join that follows uses)."""
        coordinator = self.coordinator
        lease = session_lease(coordinator)
        kept = (self.joined and lease.id == self._lease_id and lease.refresh() != -1
                and all(lock._lease.refresh() != -1
                        for lock in list(coordinator._acquired_locks)))
        coordinator.heartbeat()
        return kept

    async def _new_session(self) -> bool:
        """The lease expired while this host was away (stalled, stopped, cut off): what it
        held is another host's now. Fence, void the old locks, and join again (tried at
        each renewal until it works; the host stays fenced meanwhile)."""
        if self.joined:
            if self.healthy:
                self._fence()
            self.epoch += 1
            self.joined = False
            log.error("host %s: its coordination session expired (%.1f s without a "
                      "renewal); its locks are gone and the work it held is left to whoever "
                      "holds them now", self.host_id, time.monotonic() - self._last_renewal)
        try:
            await self.call(self._join)
        except (CoordinationUnavailable, DuplicateHostId) as exc:
            log.error("host %s cannot join again: %s", self.host_id, exc)
            return False
        return True

    def _fence(self) -> None:
        self.healthy = False
        log.error("host %s lost its coordination session: no data-changing step starts, "
                  "running jobs stop at a recoverable step", self.host_id)
        for listener in self.on_lost:
            try:
                listener()
            except Exception:
                log.exception("fencing listener failed")

    def require(self) -> None:
        if not self.fresh:
            raise CoordinationUnavailable(f"host {self.host_id} has no coordination session; "
                                          "changes are refused until it is back")

    async def members(self) -> set[str]:
        """The hosts alive in the group now."""
        found = await self.call(lambda: self.coordinator.get_members(GROUP).get())
        return {member.decode() for member in found}

    async def announce(self, volume_id: str) -> None:
        """Tell every host that volume ``volume_id`` changed on the share. A change etcd
        did not take (it was away, or this host was cut off) is kept and told after the
        next renewal that works: the other hosts' watches never saw it, and a lost one
        would leave them listing what is gone until their next rescan."""
        if self.coordinator is None:
            return
        if self.healthy:
            with contextlib.suppress(CoordinationUnavailable):
                await self.call(self.coordinator.client.put, f"{CHANGES}{volume_id}",
                                 f"{self.host_id} {time.time():.6f}")
                return
        self._unannounced.add(volume_id)

    def _announce_again(self) -> None:
        if not self._unannounced or (self._resending and not self._resending.done()):
            return
        pending, self._unannounced = sorted(self._unannounced), set()
        log.info("telling the other hosts of %d change(s) etcd did not take", len(pending))

        async def resend() -> None:
            for volume_id in pending:
                await self.announce(volume_id)

        self._resending = asyncio.get_running_loop().create_task(resend())

    def watch(self, changed: Callable[[str, str], None],
              gap: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed(volume_id, host)`` on the loop for every change any host
        announces (this host's own included), and ``gap()`` when announcements may have
        been missed; returns the function that stops watching."""
        def on_change(key: str, value: str) -> None:
            changed(key[len(CHANGES):], value.split(" ")[0])

        return self._watch(CHANGES, on_change, gap)

    def watch_members(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed()`` on the loop whenever a host joins or leaves the group (a
        member's key goes with its lease: no polling of the member list), or when such a
        change may have been missed."""
        return self._watch(f"tooz/groups/{GROUP.decode()}/", lambda _k, _v: changed(), changed)

    def _watch(self, prefix: str, handler: Callable[[str, str], None],
               gap: Callable[[], None]) -> Callable[[], None]:
        watch = PrefixWatch(self.coordinator.client, prefix, handler, gap,
                            asyncio.get_running_loop())
        watch.start()
        self._watches.append(watch)
        return watch.stop


def lease_ttl(client: Any, lease_id: int) -> int:
    """Seconds lease ``lease_id`` still runs without a renewal; 0 when it is gone (etcd
    then answers without a TTL) or cannot be asked."""
    try:
        return max(Lease(lease_id, client).ttl(), 0)
    except (KeyError, ValueError, *BACKEND_FAILURES):
        return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _still_running(pid: object) -> bool:
    """Whether ``pid`` (of this machine: the previous run noted in our state directory)
    is a hostvold still running."""
    try:
        argv = Path(f"/proc/{int(str(pid))}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"hostvold" in argv and int(str(pid)) != os.getpid()


def session_lease(coordinator: Any) -> Any:
    """The lease of the tooz session (tooz has no public accessor): its refresh says
    whether the session expired, which tooz's own heartbeat hides."""
    return coordinator._membership_lease


def now_text() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)



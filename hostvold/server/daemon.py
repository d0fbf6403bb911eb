"""The composition root: config -> shares -> index -> recovery -> ready -> serve -> stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from dbus_fast.aio import MessageBus

from hostvold import __version__
from hostvold.core.config import Config, load_config
from hostvold.core.errors import ConfigError, HostvoldError, HypervisorUnavailable
from hostvold.core.shares import ShareSpec, parse_options, parse_shares_file
from hostvold.ops.cluster import ClusterFollower
from hostvold.ops.jobs import JobRunner
from hostvold.ops.live import LiveVolumes
from hostvold.ops.operations import Operations
from hostvold.ops.rescan import ShareRescanner
from hostvold.ops.sharekeeper import ShareKeeper, mount_in_time, probe
from hostvold.ops.startup import load_index, rebuild_index
from hostvold.ops.store import VolumeStore
from hostvold.server import notify, policy
from hostvold.server.authority import Authorizer
from hostvold.server.bus import BUS_NAME, connect, lost, own_name
from hostvold.server.objects import Api
from hostvold.storage import children
from hostvold.storage.children import FenceGuard
from hostvold.storage.clusterlocks import ClusterLocks
from hostvold.storage.coordination import Coordination
from hostvold.storage.index import VolumeIndex
from hostvold.storage.locks import LocalLocks
from hostvold.storage.mounts import Share
from hostvold.storage.pathwatch import PathWatch
from hostvold.storage.permissions import file_mode, resolve_secure
from hostvold.storage.reach import qemu_preconditions
from hostvold.virt.hypervisor import Hypervisor

log = logging.getLogger("hostvold")

EX_CONFIG = 78
STOP_JOBS_SECONDS = 20  # well inside the unit's TimeoutStopSec


def share_specs(config: Config) -> list[ShareSpec]:
    """The configured shares; with none configured, the embedded local share directory."""
    shares = config.shares
    if shares.nas_host and shares.nas_share_path:
        options = f"-o {shares.nas_mount_options}" if shares.nas_mount_options else ""
        return [parse_options(f"{shares.nas_host}:{shares.nas_share_path}", options)]
    if shares.shares_config:
        specs, problems = parse_shares_file(shares.shares_config.read_text())
        for problem in problems:
            log.error("%s line %d skipped (%s): %s", shares.shares_config, problem.line,
                      problem.reason, problem.text)
        return specs
    return [ShareSpec(address=str(config.local_share_dir), fstype="none", local_dir=True)]


class Daemon:
    def __init__(self, config: Config, with_libvirt: bool = True) -> None:
        self.config = config
        self.with_libvirt = with_libvirt
        self.hypervisor: Hypervisor | None = None
        self.stop_requested = asyncio.Event()
        self.store: VolumeStore | None = None
        self.ops: Operations | None = None
        self.jobs = JobRunner()
        self.bus: MessageBus | None = None
        self.index: VolumeIndex | None = None
        self.coordination: Coordination | None = None
        self.guard: FenceGuard | None = None
        self._fencing: asyncio.Task[None] | None = None  # the jobs a fence stopped
        self._background: set[asyncio.Task[None]] = set()
        self.follower: ClusterFollower | None = None
        self._changed_before_following: set[str] = set()
        self.rescanner: ShareRescanner | None = None
        self.paths: PathWatch | None = None
        self.keeper: ShareKeeper | None = None

    async def start(self) -> Operations:
        config = self.config
        state_dir = config.daemon.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        # others may pass (QEMU's user reaches the default share and the mount base inside)
        # but not list; the index and the locks inside stay the daemon's own
        os.chmod(state_dir, 0o711)
        notify.status("mounting shares")
        base = config.mount_point_base
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.with_libvirt:
            local = config.local_share_dir if not (
                config.shares.shares_config or config.shares.nas_host) else None
            for problem in qemu_preconditions(base, local):
                log.warning("%s", problem)
        shares = [Share(spec, spec.mount_point(base), timeout=config.shares.storage_timeout)
                  for spec in share_specs(config)]
        self.paths = PathWatch(shares)
        try:
            await self.paths.start()  # a share whose path is down is not even mounted
        except OSError as exc:
            log.error("no netlink: the storage paths are not watched (%s)", exc)
        await asyncio.gather(*(mount_in_time(share, config.shares.mount_attempts)
                               for share in shares))
        await asyncio.gather(*(probe(share) for share in shares))
        for share in shares:
            if not share.usable:
                log.error("share %s unavailable: %s", share.spec.address,
                          share.error or share.hung or share.path_detail)
        self.index = VolumeIndex(state_dir / "index.sqlite")
        for private in state_dir.glob("index.sqlite*"):
            os.chmod(private, 0o600)
        locks = await self._locks(state_dir / "locks")
        store = VolumeStore(config, shares, self.index, locks, 0o660)
        # what this start changes (recovery, the attachments libvirt shows) is announced to
        # the other hosts once the cluster is followed
        store.change_listeners.append(self._changed_before_following.add)
        notify.status("loading the volume index")
        if self.index.fresh:
            await rebuild_index(store)
        else:
            await load_index(store)
        self.rescanner = ShareRescanner(store)
        await self.rescanner.prime()  # volumes made elsewhere while we were down
        first = next((s.mount_point for s in shares if s.usable), None)
        secure = resolve_secure(config.volumes.nas_secure_file_permissions, first,
                                new_install=not store.list_volumes())
        store.file_mode = file_mode(secure)
        ops = Operations(store)  # the use cases register their recovery steps
        ops.access.coordination = self.coordination
        if self.with_libvirt:
            await self._connect_libvirt(ops)
        notify.status("recovering interrupted operations")
        await ops.recover()
        if ops.live is not None and self.hypervisor is not None \
                and self.hypervisor.conn is not None:
            await ops.live.reconcile()
        self.store, self.ops = store, ops
        self.keeper = ShareKeeper(store, self.jobs, config.shares.mount_attempts,
                                  self._bring_back)
        self.keeper.watch()
        return ops

    async def _bring_back(self, share: Share) -> None:
        """A share that was away answers again: what changed on it is read, and the
        operations it interrupted are finished."""
        assert self.rescanner is not None and self.ops is not None
        await self.rescanner.scan(share)
        await self.ops.take_over()

    async def _locks(self, directory: Path) -> LocalLocks:
        """Per-volume locks: the cluster's through etcd, or this host's alone."""
        settings = self.config.coordination
        children.install(settings.host, None)
        if not settings.distributed:
            log.info("single-host: no [coordination] backend_url, so locks are local to this "
                     "host (%s); never let two hosts share a share this way", settings.host)
            return LocalLocks(Path(settings.backend_url[len("file://"):]) if
                              settings.backend_url.startswith("file://") else directory)
        notify.status("joining the cluster")
        self.coordination = Coordination(settings.backend_url, settings.host,
                                         settings.lease_seconds, self.config.daemon.state_dir)
        await self.coordination.start()
        self.coordination.on_lost.append(self._fenced)
        self.coordination.on_back.append(self._catch_up)
        # this host's qemu-img children die when its lease could have lapsed
        self.guard = FenceGuard(settings.host, self.coordination.require,
                                settings.lease_seconds)
        await self.guard.start(self.coordination.deadline)
        self.coordination.on_renewed.append(self.guard.extend)
        children.install(settings.host, self.guard)
        return ClusterLocks(directory, self.coordination)

    async def _follow_cluster(self) -> None:
        """With etcd: changes of other hosts refresh our picture; departed hosts' work is
        taken over."""
        if self.coordination is not None and self.store is not None and self.ops is not None:
            self.follower = ClusterFollower(self.store, self.ops, self.coordination,
                                            self._catch_up)
            await self.follower.start()
        if self.store is not None:
            self.store.change_listeners.remove(self._changed_before_following.add)
            if self.follower is not None:
                self.follower.announce(sorted(self._changed_before_following))
            self._changed_before_following.clear()

    def _catch_up(self) -> None:
        """This host was fenced (stalled, stopped, cut off) and is back: once its stopped
        jobs have ended, what the other hosts changed meanwhile is read from the shares
        (whatever the watches delivered), and what is still this host's is finished."""
        fencing = self._fencing

        async def catch_up() -> None:
            if fencing is not None:
                await asyncio.gather(fencing, return_exceptions=True)
            if self.store is None or self.rescanner is None or self.ops is None:
                return
            for share in self.store.mounted_shares():
                await self.rescanner.scan(share)
            await self.ops.take_over()

        task = asyncio.get_running_loop().create_task(catch_up())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fenced(self) -> None:
        """This host lost its coordination session: its running jobs stop at their next
        recoverable step before its lease can expire and another host takes over."""
        task = asyncio.get_running_loop().create_task(self.jobs.cancel_all())
        self._fencing = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _connect_libvirt(self, ops: Operations) -> None:
        config = self.config
        self.hypervisor = Hypervisor(config.libvirt.uri, config.daemon.workers,
                                     config.libvirt.keepalive)
        notify.status("connecting to libvirt")
        ops.access.live = LiveVolumes(config, ops.store, self.hypervisor)
        # group snapshots a lost libvirt left half-way, and their deletes, go on with it
        self.hypervisor.on_reconnect += [ops.groups.recover, ops.group_changes.finish_marked]
        try:
            await self.hypervisor.connect()
        except HypervisorUnavailable as exc:
            # without libvirt's word no step may change a volume a domain could use: those
            # calls are refused until the connection is back, retried in the background
            log.error("%s: changes to volumes are refused until libvirt answers", exc)
            self.hypervisor.reconnect()

    async def stop(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.paths is not None:
            self.paths.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.coordination is not None:
            await self.coordination.stop()
        if self.guard is not None:
            await self.guard.stop()
        if self.hypervisor is not None:
            await self.hypervisor.close()
        if self.index is not None:
            self.index.close()

    async def serve(self) -> Api:
        """Put the started services on the bus; the name is owned last, when all is there."""
        assert self.store is not None and self.ops is not None
        notify.status("connecting to the bus")
        self.bus = await connect(self.config.daemon.bus)
        polkit = self.config.daemon.authorization == "polkit"
        if self.config.daemon.bus == "system":  # the installed policy must admit admin_group
            for warning in policy.check_installed(self.config.daemon.admin_group,
                                                  polkit=polkit):
                log.warning("%s", warning)
        authorizer = Authorizer(self.bus, self.config.daemon.admin_group, polkit)
        log.info("%s", await authorizer.describe())
        api = Api(self.bus, self.store, self.ops, self.jobs, authorizer)
        api.export_all()
        await own_name(self.bus)
        return api

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        watchdog = notify.start_watchdog()
        try:
            store = (await self.start()).store
            api = await self.serve()
        except HostvoldError as exc:
            log.error("cannot start: %s", exc)
            return 1
        except ConfigError as exc:  # e.g. a host id another live daemon has
            log.error("cannot start: %s", exc)
            await self.stop()
            return EX_CONFIG
        mounted = len(store.mounted_shares())
        summary = (f"{len(store.list_volumes())} volumes on {mounted}/{len(store.shares)} "
                   f"shares, serving {BUS_NAME}")
        log.info("hostvold %s ready: %s", __version__, summary)
        notify.ready(summary)
        if self.guard is not None:
            self.guard.watch_daemon()
        await self._follow_cluster()
        rescans = asyncio.get_running_loop().create_task(self._rescan_shares())
        bus_lost = asyncio.get_running_loop().create_task(self._stop_when_bus_lost())
        self.jobs.listeners.append(lambda job, names: self._job_status(summary, names))
        await self.stop_requested.wait()
        log.info("stopping: no new calls; running jobs stop at a safe, recoverable state")
        notify.stopping()
        assert self.bus is not None
        status = 1 if bus_lost.done() else 0
        bus_lost.cancel()
        if not status:
            await self.bus.release_name(BUS_NAME)
        rescans.cancel()
        await asyncio.gather(rescans, return_exceptions=True)  # no rescan holds a lock now
        try:  # a job stuck on a dead share must not keep the daemon from stopping
            await asyncio.wait_for(self.jobs.cancel_all(), STOP_JOBS_SECONDS)
        except TimeoutError:
            log.error("jobs still running after %d s (their storage does not answer); "
                      "stopping anyway: each is recovered at the next start", STOP_JOBS_SECONDS)
        with contextlib.suppress(Exception):  # already gone when it was lost
            self.bus.disconnect()
        if watchdog is not None:
            watchdog.cancel()
        await self.stop()
        del api
        return status

    async def _stop_when_bus_lost(self) -> None:
        """Cut from its bus, the daemon serves no one and no one can stop it: it stops as
        on SIGTERM, status 1, and systemd (Restart=on-failure) starts it on a fresh bus."""
        assert self.bus is not None
        reason = await lost(self.bus)
        log.error("lost the D-Bus connection (%s): stopping, to be started again", reason)
        self.stop_requested.set()

    async def _rescan_shares(self) -> None:
        """Every ``rescan_interval`` seconds: a stat of each share directory, and a rescan
        of those that changed (changes made by other hosts or by Cinder show up)."""
        assert self.rescanner is not None
        while True:
            await asyncio.sleep(self.config.coordination.rescan_interval)
            try:
                await self.rescanner.check()
            except Exception:  # the next round tries again; the daemon goes on
                log.exception("rescan of the shares failed")

    def _job_status(self, summary: str, names: set[str]) -> None:
        """A STATUS= line for systemctl status whenever a job starts or ends."""
        if "State" in names or not names:
            running = sum(1 for job in self.jobs.jobs.values() if job.state == "running")
            notify.status(f"{summary}; {running} job(s) running")


def setup_logging(level: str) -> None:
    """stderr, or the journal when systemd runs us; there, ``extra={"VOLUME_ID": ...}``
    on a log call becomes a structured journal field."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        from systemd.journal import JournalHandler
        handler = JournalHandler(SYSLOG_IDENTIFIER="hostvold")
        handler.setFormatter(logging.Formatter("%(message)s"))  # the journal adds the rest
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def return_large_buffers() -> None:
    """glibc raises its mmap threshold each time a large buffer is freed, and from then on
    keeps buffers of that size in the heap for good: a 10 MB GetManagedObjects answer would
    stay in the daemon's memory after it is sent. Fixed at 1 MiB, buffers that large are
    given back when freed. (Other C libraries: nothing to do.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostvold", description=__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="configuration file (default /etc/hostvold/hostvold.conf)")
    parser.add_argument("--version", action="version", version=f"hostvold {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hostvold: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.daemon.log_level)
    return_large_buffers()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: dump stacks
    loop = asyncio.new_event_loop()
    code = loop.run_until_complete(Daemon(config).run())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # not asyncio.run() nor a normal exit: both wait for every worker thread, and a thread
    # in a call into a dead share never returns. Everything durable is written by now.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

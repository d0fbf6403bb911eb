"""Fuzz every method of every hostvold D-Bus interface with generated options.

    python bench/fuzz_api.py [--bus ADDRESS] [--calls 10000] [--seed N] [--scratch DIR]

Without ``--bus`` it starts its own dbus-daemon and hostvold (root only; a local share
directory, libvirt's test driver) and afterwards also checks that the daemon is still up,
that its log holds no traceback and that it kept no file descriptor. With ``--bus`` it calls
a running daemon as whoever runs it (root, or an admin-group user through ``runuser``), so
it is self-contained: it imports only dbus-fast, hypothesis and the standard library.

Each call goes to one method of one object (the manager, an existing or a made-up volume,
snapshot or job) with options drawn by hypothesis: known and unknown keys, every D-Bus type
(wrong ones on purpose), huge and negative numbers, unicode, NUL bytes (D-Bus strings cannot
carry NUL: such strings go as byte arrays), ids that are paths, and file descriptors of
directories, sockets, pipes, devices, read-only and write-only files and O_PATH handles.

Checks, per call: the reply is a method return or an ``org.hostvold1.Error.*`` error (never
``org.freedesktop.DBus.Error.Failed``, dbus-fast's unnamed ServiceError or an ``Error.Failed``
"internal error"); a refused call changes nothing (the managed objects, but jobs, are the
same before and after); an accepted call's job ends with success or a named error, never an
internal error, and never with an error its own arguments made certain (DOOMED: what the
call could have refused at once). The next-to-last line of output is a JSON summary (calls,
refusals, jobs, error names, violations); the last is one line of counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import InvalidMessageError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

BUS_NAME = "org.hostvold1"
ROOT = "/org/hostvold1"
PREFIX = "org.hostvold1."
METHODS: dict[str, list[str]] = {
    "Manager": ["CreateVolume", "ImportVolume", "Status"],
    "Volume": ["CreateSnapshot", "Extend", "Clone", "Export", "Revert", "Attach", "Detach",
               "Repair", "Delete"],
    "Snapshot": ["Delete", "CreateVolume"],
    "Job": ["Cancel"],
}
NO_ARGS = {"Status", "Cancel"}
KNOWN_KEYS = ["size", "id", "format", "provisioning", "share", "fd", "source",
              "source_format", "destination", "snapshot", "domain", "target", "choice"]
MAX_U64 = (1 << 64) - 1
# a job that fails with one of these was doomed by its call's own arguments (a bad value,
# an id taken, a missing object, an image handed over that must not be used): the call
# should have been refused with it, before any job existed
DOOMED = {f"{PREFIX}Error.{name}" for name in (
    "InvalidArgument", "AlreadyExists", "NotFound", "UnsafeImage", "UnsafeFile",
    "BackingFileOutsideVolume", "ForeignBackingFile", "ExternalDataFile",
    "UnknownImageFeature")}


class Fds:
    """Descriptors of every kind a caller could pass, opened once and kept open."""

    def __init__(self, scratch: str) -> None:
        self.scratch = scratch
        left, right = socket.socketpair()
        read_end, write_end = os.pipe()
        self.keep: list[Any] = [left, right]
        mine = os.path.join(scratch, f"fuzz-own-{os.getpid()}.raw")
        with open(mine, "wb") as image:
            image.truncate(1 << 20)
        self.named: dict[str, int] = {
            "directory": os.open("/", os.O_RDONLY | os.O_DIRECTORY),
            "socket": left.fileno(), "pipe-read": read_end, "pipe-write": write_end,
            "dev-null": os.open("/dev/null", os.O_RDWR),
            "own-file-ro": os.open(mine, os.O_RDONLY),
            "own-file-wo": os.open(mine, os.O_WRONLY),
            "etc-passwd-ro": os.open("/etc/passwd", os.O_RDONLY),
            "etc-shadow-path": os.open("/etc/shadow", os.O_PATH),
        }

    def names(self) -> list[str]:
        return sorted(self.named)


NEW_VOLUME = {"id": "s", "size": "t", "format": "s", "share": "s"}
OPTIONS: dict[str, dict[str, str]] = {  # each method's own options and their D-Bus types
    "CreateVolume": {**NEW_VOLUME, "provisioning": "s"},
    "ImportVolume": {**NEW_VOLUME, "fd": "h", "source": "s", "source_format": "s"},
    "CreateSnapshot": {"id": "s"}, "Extend": {"size": "t"}, "Clone": NEW_VOLUME,
    "Export": {"fd": "h", "destination": "s", "format": "s"}, "Revert": {"snapshot": "o"},
    "Attach": {"domain": "s", "target": "s"}, "Repair": {"format": "s"},
}
# "index-N": a bare index N; with no descriptor in the message it is no descriptor at all
# (the daemon must not take it for one of its own open files)
FD_KINDS = ["directory", "socket", "pipe-read", "pipe-write", "dev-null", "own-file-ro",
            "own-file-wo", "etc-passwd-ro", "etc-shadow-path",
            *(f"index-{n}" for n in (0, 3, 5, 7, 9, 11, 13, 17))]


def typed(signature: str, ids: list[str]) -> st.SearchStrategy[Any]:
    """Values of one D-Bus type, hostile ones first; ``ids`` are real object ids."""
    nasty = st.sampled_from([
        "", "..", "../../etc/passwd", "/etc/shadow", "/dev/sda", "raw", "qcow2", "vmdk",
        "json:{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}", "thin", "thick",
        "00000000-0000-4000-8000-000000000000", "3F2A0000-0000-4000-8000-00000000000A",
        "volume-00000000-0000-4000-8000-000000000000", "/tmp/fuzz-out", "relative/path",
        "sda", "vdb", "\u202e\u0000", "é" * 300, "a\x00b", "/org/hostvold1/snapshots/x",
        *ids])
    text = st.one_of(nasty, st.text(max_size=40))
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "s": text,
        "t": st.one_of(st.sampled_from([0, 1, 511, 512, 1 << 20, 4 << 20, (1 << 50) + 512,
                                        MAX_U64, 1 << 63]), st.integers(0, MAX_U64)),
        "x": st.integers(-(1 << 63), (1 << 63) - 1),
        "i": st.integers(-(1 << 31), (1 << 31) - 1),
        "u": st.integers(0, (1 << 32) - 1),
        "b": st.booleans(),
        "d": st.floats(allow_nan=True),
        "as": st.lists(text, max_size=3),
        "ay": st.binary(max_size=20),
        "o": st.sampled_from([ROOT, f"{ROOT}/volumes/x", "/", f"{ROOT}/snapshots/_",
                              *(f"{ROOT}/snapshots/{i.replace('-', '_')}" for i in ids)]),
        "a{sv}": st.dictionaries(st.text(max_size=8), st.text(max_size=8).map(
            lambda value: Variant("s", value)), max_size=2),
        "h": st.sampled_from(FD_KINDS),
    }
    return strategies[signature]


def value_strategy(ids: list[str]) -> st.SearchStrategy[tuple[str, Any]]:
    """(signature, value) pairs of every D-Bus type."""
    return st.sampled_from(["s", "t", "x", "i", "u", "b", "d", "as", "ay", "o", "a{sv}",
                            "h"]).flatmap(lambda sig: st.tuples(st.just(sig),
                                                                typed(sig, ids)))


def options_strategy(member: str, ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly the method's own options with the right types and hostile values (what gets
    past the type check), sometimes anything at all (unknown keys, wrong types)."""
    own = OPTIONS.get(member, {})
    wild = st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1,
                                                                          max_size=12)),
                           value_strategy(ids), max_size=4)
    if not own:
        return st.one_of(st.just({}), wild)
    well_typed = st.fixed_dictionaries({}, optional={
        key: st.tuples(st.just(sig), typed(sig, ids)) for key, sig in own.items()})
    return st.one_of(well_typed, well_typed, well_typed, wild)


Call = tuple[str, str | int, str, dict[str, Any]]


def call_strategy(ids: list[str]) -> st.SearchStrategy[Call]:
    """(kind, target, member, options); target is an index into the objects of that kind
    that exist when the call is made, or a made-up object name."""
    made_up = st.sampled_from(["etc", "00000000_0000_4000_8000_000000000000", "_", "x__y"])

    def build(kind_member: tuple[str, str]) -> st.SearchStrategy[Call]:
        kind, member = kind_member
        targets = st.one_of(st.integers(0, 1000), st.integers(0, 1000),
                            st.integers(0, 1000), made_up)
        return st.tuples(st.just(kind), targets, st.just(member),
                         options_strategy(member, ids))

    pairs = [(kind, member) for kind, members in sorted(METHODS.items())
             for member in members]
    return st.sampled_from(pairs).flatmap(build)


class DaemonBroken(Exception):
    """The daemon stopped answering what every reader may ask: stop fuzzing, report it."""


class Fuzzer:
    def __init__(self, bus: MessageBus, fds: Fds) -> None:
        self.bus = bus
        self.fds = fds
        self.calls = 0
        self.refused = 0
        self.jobs = 0
        self.errors: Counter[str] = Counter()
        self.job_errors: Counter[str] = Counter()
        self.violations: list[str] = []
        self.unnamed = 0
        self.doomed = 0

    def unnamed_error(self, what: str, name: str, message: str) -> None:
        self.unnamed += 1
        self.violations.append(f"{what}: unnamed error {name}: {message}")

    async def managed(self) -> dict[str, Any]:
        reply = await self.bus.call(Message(
            destination=BUS_NAME, path=ROOT, interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects"))
        assert reply is not None
        if reply.message_type != MessageType.METHOD_RETURN:
            raise DaemonBroken(f"GetManagedObjects answered {reply.error_name}: "
                               f"{reply.body[:1]!r}")
        return reply.body[0]

    def fingerprint(self, managed: dict[str, Any]) -> str:
        """The objects' state, but jobs and free space (other callers may run jobs)."""
        state = {}
        for path, ifaces in managed.items():
            if "/jobs/" in path:
                continue
            for iface, props in ifaces.items():
                state[f"{path} {iface}"] = {k: repr(v.value) for k, v in props.items()
                                            if k not in ("Free",)}
        return json.dumps(state, sort_keys=True)

    def ids(self, managed: dict[str, Any]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {"volumes": [], "snapshots": [], "jobs": []}
        for path in managed:
            for kind in found:
                if path.startswith(f"{ROOT}/{kind}/"):
                    found[kind].append(path)
        return found

    def encode(self, options: dict[str, Any]) -> tuple[dict[str, Variant], list[int]]:
        body: dict[str, Variant] = {}
        fds: list[int] = []
        for key, (signature, value) in options.items():
            if signature == "h":
                if value.startswith("index-"):
                    body[key] = Variant("h", int(value.split("-")[1]))
                    continue
                fds.append(self.fds.named[value])
                body[key] = Variant("h", len(fds) - 1)
            elif signature == "s" and "\x00" in value:  # D-Bus strings cannot hold NUL
                body[key] = Variant("ay", value.encode("utf-8", "surrogatepass"))
            else:
                body[key] = Variant(signature, value)
        return body, fds

    async def one(self, kind: str, target: str | int, member: str,
                  options: dict[str, Any]) -> None:
        managed = await self.ensure_objects(await self.managed())
        before = self.fingerprint(managed)
        plural = {"Volume": "volumes", "Snapshot": "snapshots", "Job": "jobs"}.get(kind)
        if plural is None:
            path = ROOT
        elif isinstance(target, str):
            path = f"{ROOT}/{plural}/{target}"
        else:
            real = self.ids(managed)[plural]
            path = real[target % len(real)] if real else f"{ROOT}/{plural}/gone"
        body, fds = self.encode({k.replace("\x00", "0"): v for k, v in options.items()})
        args = ([], "") if member in NO_ARGS else ([body], "a{sv}")
        message = Message(destination=BUS_NAME, path=path, interface=PREFIX + kind,
                          member=member, signature=args[1], body=args[0], unix_fds=fds)
        try:
            message._marshall(True)
        except (InvalidMessageError, ValueError, TypeError, UnicodeError):
            return  # not a D-Bus message at all: nothing to send
        self.calls += 1
        reply = await self.bus.call(message)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            self.refused += 1
            name = reply.error_name or ""
            self.errors[name] += 1
            text = str(reply.body[0]) if reply.body else ""
            if (not name.startswith(PREFIX + "Error.") or "ServiceError" in name
                    or "internal error" in text):
                self.unnamed_error(f"{kind}.{member} {options!r}", name, text)
            after = self.fingerprint(await self.managed())
            if after != before and not await self.jobs_running():
                old, new = json.loads(before), json.loads(after)
                changed = sorted(key for key in set(old) | set(new)
                                 if old.get(key) != new.get(key))
                self.violations.append(f"{kind}.{member} {options!r}: refused ({name}) but "
                                       f"the objects changed: {changed}")
            return
        if member in NO_ARGS or (kind == "Volume" and member in ("CreateSnapshot", "Repair")):
            await asyncio.sleep(0.3)  # share usage is re-measured 0.2 s after a change
            return
        self.jobs += 1
        await self.wait_job(str(reply.body[0]), f"{kind}.{member} {options!r}",
                            doomable=True)
        await asyncio.sleep(0.3)  # share usage is re-measured 0.2 s after a change

    async def ensure_objects(self, managed: dict[str, Any]) -> dict[str, Any]:
        """Keep two volumes and a snapshot around (fuzzed calls delete them); these set-up
        calls are not counted."""
        found = self.ids(managed)
        if len(found["volumes"]) >= 2 and found["snapshots"]:
            return managed
        if len(found["volumes"]) < 2:
            reply = await self.bus.call(Message(
                destination=BUS_NAME, path=ROOT, interface=PREFIX + "Manager",
                member="CreateVolume", signature="a{sv}",
                body=[{"size": Variant("t", 1 << 20)}]))
            assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, \
                reply and reply.body
            await self.wait_job(str(reply.body[0]), "set-up CreateVolume")
        else:
            reply = await self.bus.call(Message(
                destination=BUS_NAME, path=found["volumes"][0], member="CreateSnapshot",
                interface=PREFIX + "Volume", signature="a{sv}", body=[{}]))
            assert reply is not None
        await asyncio.sleep(0.3)
        return await self.ensure_objects(await self.managed())

    async def jobs_running(self) -> bool:
        managed = await self.managed()
        return any(ifaces.get(PREFIX + "Job", {}).get("State", Variant("s", "")).value
                   == "running" for ifaces in managed.values())

    async def wait_job(self, path: str, what: str, doomable: bool = False) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            reply = await self.bus.call(Message(
                destination=BUS_NAME, path=path, interface="org.freedesktop.DBus.Properties",
                member="GetAll", signature="s", body=[PREFIX + "Job"]))
            assert reply is not None
            if reply.message_type == MessageType.ERROR:
                return  # already forgotten
            props = reply.body[0]
            if props["State"].value != "running":
                name, message = props["Error"].value
                if name:
                    self.job_errors[name] += 1
                    if not name.startswith(PREFIX + "Error.") or "internal error" in message:
                        self.unnamed_error(f"{what}: job", name, message)
                    elif doomable and name in DOOMED:
                        self.doomed += 1
                        self.violations.append(f"{what}: job accepted, then failed {name}: "
                                               f"{message}")
                return
            await asyncio.sleep(0.02)
        self.violations.append(f"{what}: job {path} still running after 120 s")


async def connect(address: str) -> MessageBus:
    bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    return await bus.connect()


def run(address: str, calls: int, seed: int, scratch: str,
        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    bus = loop.run_until_complete(connect(address))
    fuzzer = Fuzzer(bus, Fds(scratch))
    ids = [path.rsplit("/", 1)[1].replace("_", "-") for paths in fuzzer.ids(
        loop.run_until_complete(fuzzer.managed())).values() for path in paths]

    last: list[Call] = []

    @settings(max_examples=calls + calls // 20 + 10, database=None, deadline=None,
              derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(call_strategy(ids))
    def fuzz(call: Call) -> None:
        if fuzzer.calls >= calls:
            return  # enough sent (a few drawn calls cannot be D-Bus messages at all)
        last[:] = [call]
        loop.run_until_complete(fuzzer.one(*call))
        if progress is not None and fuzzer.calls % 1000 == 0:
            progress(fuzzer.calls)

    try:
        fuzz()
    except DaemonBroken as exc:
        fuzzer.violations.append(f"after {fuzzer.calls} calls (the last {last!r}): {exc}")
    bus.disconnect()
    loop.close()
    return {"calls": fuzzer.calls, "refused": fuzzer.refused, "jobs": fuzzer.jobs,
            "errors": dict(sorted(fuzzer.errors.items())),
            "job_errors": dict(sorted(fuzzer.job_errors.items())),
            "unnamed": fuzzer.unnamed, "doomed": fuzzer.doomed,
            "violation_count": len(fuzzer.violations), "violations": fuzzer.violations,
            "uid": os.getuid()}


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={socket}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_destination="*"/><allow receive_type="method_call"/>
<allow receive_type="method_return"/><allow receive_type="error"/>
<allow receive_type="signal"/><allow send_type="signal"/>
<allow send_requested_reply="true" send_type="method_return"/>
<allow send_requested_reply="true" send_type="error"/></policy></busconfig>"""


class PrivateDaemon:
    """A dbus-daemon and a hostvold of the fuzzer's own, in a temporary directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        config = os.path.join(root, "bus.conf")
        with open(config, "w") as out:
            out.write(BUS_CONFIG.format(socket=os.path.join(root, "bus")))
        self.bus = subprocess.Popen(["dbus-daemon", "--nofork", "--print-address=1",
                                     f"--config-file={config}"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        assert self.bus.stdout is not None
        self.address = self.bus.stdout.readline().strip()
        # the share: a 1 GiB ext4 image the daemon loop-mounts (thick volumes of fuzzed sizes
        # must hit a real NoSpace, never fill the host's disk)
        image = os.path.join(root, "share.img")
        with open(image, "wb") as out:
            out.truncate(1 << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True)
        shares = os.path.join(root, "shares")
        with open(shares, "w") as out:
            out.write(f"{image} -t ext4 -o loop\n")
        conf = os.path.join(root, "hostvold.conf")
        with open(conf, "w") as out:
            out.write(f"[daemon]\nstate_dir = {root}/state\nbus = {self.address}\n"
                      f"[shares]\nshares_config = {shares}\n"
                      "[libvirt]\nuri = test:///default\n")
        notify = os.path.join(root, "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(notify)
        listener.settimeout(60)
        self.log = os.path.join(root, "hostvold.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hostvold", "--config", conf],
                                         env=dict(os.environ, NOTIFY_SOCKET=notify),
                                         stderr=log)
        while b"READY=1" not in listener.recv(4096):
            if self.proc.poll() is not None:
                raise SystemExit(f"hostvold exited {self.proc.returncode}")
        # kept open and drained, as systemd does: STATUS= lines keep coming
        listener.settimeout(None)
        self.listener = listener
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                self.listener.recv(4096)
            except OSError:
                return

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.listener.close()
        self.bus.terminate()
        self.bus.wait(10)
        mounts = os.path.join(self.root, "state", "mnt")
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info if line.split()[4].startswith(mounts)]
        for point in points:
            subprocess.run(["umount", "-l", point], check=False)
        self.bus.terminate()
        self.bus.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bus", help="the D-Bus address of a running hostvold (default: "
                        "start a private one)")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--scratch", default=tempfile.gettempdir(),
                        help="a directory for the fuzzer's own small file")
    args = parser.parse_args()
    started = time.monotonic()
    tracebacks = "unchecked (--bus)"
    private = None
    root = tempfile.mkdtemp(prefix="hostvold-fuzz-")
    try:
        address = args.bus
        if address is None:
            private = PrivateDaemon(root)
            address, fds_before = private.address, private.open_fds()
        summary = run(address, args.calls, args.seed, args.scratch,
                      lambda n: print(f"{n} calls", file=sys.stderr, flush=True))
        if private is not None:
            time.sleep(3)  # descriptors that reached no method are closed after 2 s
            alive = private.proc.poll() is None
            with open(private.log) as log:
                text = log.read()
            leaked = private.open_fds() - fds_before
            private.stop()
            # asyncio reports a lost task's error without a traceback when it has none
            tracebacks = str(text.count("Traceback") + text.count("never retrieved"))
            print(f"daemon alive: {alive}; tracebacks in its log: {tracebacks}; "
                  f"file descriptors kept: {leaked}")
            if not alive or tracebacks != "0" or leaked > 2:
                summary["violations"].append("daemon crashed, logged a traceback or leaked")
                summary["violation_count"] += 1
            private = None
    finally:
        if private is not None:
            private.stop()
    if summary["violations"]:
        with open(os.path.join(root, "violations.txt"), "w") as out:
            out.write("\n".join(summary["violations"]) + "\n")
        summary["violations"] = summary["violations"][:20]
        print(f"kept {root} (the daemon's log: hostvold.log; all violations: violations.txt)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    names = sorted(set(summary["errors"]) | set(summary["job_errors"]))
    print(f"calls: {summary['calls']}, refused: {summary['refused']}, jobs: {summary['jobs']}")
    print(f"distinct error names ({len(names)}): {', '.join(names)}")
    print(json.dumps(summary))
    others = summary["violation_count"] - summary["unnamed"] - summary["doomed"]
    print(f"fuzz summary: seed {args.seed}, {summary['calls']} calls, "
          f"{summary['refused']} refused, {summary['jobs']} jobs, "
          f"{sum(summary['job_errors'].values())} failed jobs; "
          f"unnamed errors {summary['unnamed']}, tracebacks {tracebacks}, "
          f"doomed jobs {summary['doomed']}, other violations {others}; "
          f"{time.monotonic() - started:.0f} s")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

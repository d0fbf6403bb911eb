"""`hostvolctl export-changes` and `restore-changes` (SPEC section 5b) through the real
client, against a real daemon process on a real private dbus-daemon: a backup chain (a full
copy, then increments) restores every point in time exactly, as `qemu-img compare` sees it
against copies qemu-img made itself; a deleted snapshot falls back; nothing is left behind,
not even after the daemon is killed in the middle of an export; a non-admin user cannot
export."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from tests.conftest import DaemonProcess, Host, need
from tests.test_cli_docs import complete, generate
from tests.test_dbus import (  # noqa: F401  (fixtures)
    Cli,
    readable_package,
    running,
    users,
    with_bus,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
SIZE = 64 * MiB
CONTEXT = "qemu:dirty-bitmap:hostvold-changes"


def object_id(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


def compare(a: Path, b: Path) -> bool:
    """Whether two raw images hold the same bytes (qemu-img compare: 0 same, 1 differ)."""
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a),
                             str(b)], capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def failed(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The command failed with ``code`` and one sentence holding ``words``, no traceback."""
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("hostvolctl: ") and result.stderr.count("\n") == 1
    for word in words:
        assert word in result.stderr, (word, result.stderr)


class Lab:
    """One volume of a real daemon, seeded writes into its active file, and full raw
    copies of its points in time made by qemu-img from the files (the expected images)."""

    def __init__(self, cli: Cli, host: Host, scratch: Path, seed: int,
                 fmt: str = "raw") -> None:
        self.cli, self.host, self.scratch = cli, host, scratch
        self.random = random.Random(seed)
        self.volume = cli.json("create", "64M", "--format", fmt)["Id"]
        self.expected: dict[str, Path] = {}

    def active(self) -> tuple[str, str]:
        info = self.cli.json("show", self.volume)["ConnectionInfo"]
        return info["path"], info["format"]

    def scribble(self, writes: int = 10, zeros: bool = False) -> None:
        """Seeded writes into the active file (with ``zeros``: zero-writes and discards
        too), by qemu-io, as a guest would."""
        path, fmt = self.active()
        argv = ["qemu-io", "-f", fmt, path]
        for i in range(writes):
            start = self.random.randrange(0, (SIZE - MiB) // 4096) * 4096
            length = self.random.choice([4096, 65536, 300 * 1024, MiB])
            command = f"write -P {self.random.randrange(1, 255)}"
            if zeros and i % 3 == 1:
                command = "write -z"
            elif zeros and i % 3 == 2:
                command = "discard"
            argv += ["-c", f"{command} {start} {length}"]
        result = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert "failed" not in result.stdout.lower(), result.stdout

    def copy(self, name: str) -> Path:
        """The volume's content now, as a raw file qemu-img made from its chain."""
        path, fmt = self.active()
        out = self.scratch / f"expected-{name}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(out)],
                       check=True)
        self.expected[name] = out
        return out

    def snapshot(self) -> str:
        taken = self.copy("pending")
        sid: str = self.cli.json("snapshot", "create", self.volume)["Id"]
        self.expected[sid] = taken.rename(self.scratch / f"expected-{sid}.raw")
        del self.expected["pending"]
        return sid

    def export(self, name: str, *options: str, text: bool = False) -> dict[str, Any]:
        """``export-changes`` into scratch/NAME; what it printed (--json), its map, and
        the checks that it left nothing behind."""
        output = self.scratch / name
        if text:
            result = self.cli.run("export-changes", self.volume, str(output), *options)
            assert result.returncode == 0, result.stderr
            printed: dict[str, Any] = {"text": result.stdout}
        else:
            printed = self.cli.json("export-changes", self.volume, str(output), *options)
        document = json.loads(Path(f"{output}.json").read_text())
        self.left_nothing_behind()
        jobs = {j["path"]: j for j in self.cli.json("jobs")
                if j["Operation"] == "export-changes"}
        assert jobs and all(j["State"] != "running" for j in jobs.values()), jobs
        if not text:
            assert jobs[printed["job"]]["State"] == "completed"
            assert {k: printed[k] for k in document} == document
        return {**printed, "map": document, "path": output}

    def left_nothing_behind(self) -> None:
        exports = self.host.state_dir / "exports"
        assert not exports.exists() or list(exports.iterdir()) == []
        assert servers(self.host) == []

    def restore(self, base: Path, increment: Path, *, onto: Path | None = None) -> Path:
        """A copy of ``base`` (or ``base`` itself, ``onto``) with ``increment`` applied."""
        target = onto or self.scratch / f"restored-{increment.name}-{base.name}"
        if onto is None:
            shutil.copyfile(base, target)
        result = self.cli.run("restore-changes", str(target), str(increment))
        assert result.returncode == 0, result.stderr
        return target


def servers(host: Host) -> list[str]:
    """The changes NBD servers of this host's daemon (others may run in other tests)."""
    found = subprocess.run(["pgrep", "-f", "qemu-nbd -r -f qcow2 -B hostvold-changes "
                            f"{host.state_dir}/exports/"], capture_output=True, text=True)
    return found.stdout.split()


def check_map(document: dict[str, Any], volume: str, since: str, to: str) -> None:
    assert document["volume"] == volume and document["from"] == since
    assert document["to"] == to and document["size"] == SIZE
    assert document["context"] == CONTEXT
    offset = 0
    for extent in document["extents"]:
        assert set(extent) == {"start", "length", "dirty", "zero"}
        assert extent["start"] == offset and extent["length"] > 0
        offset += extent["length"]
    assert offset == SIZE


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def changed(document: dict[str, Any], data_only: bool = False) -> int:
    return sum(e["length"] for e in document["extents"]
               if e["dirty"] and not (data_only and e["zero"]))


def test_backup_chain_restores_every_point_in_time(
        running: Callable[..., tuple[Host, Cli]], tmp_path: Path) -> None:  # noqa: F811
    host, cli = running()
    lab = Lab(cli, host, tmp_path, seed=5)
    lab.scribble()
    s1 = lab.snapshot()
    full1 = tmp_path / "full1.raw"  # the chain's first link: a full copy by hostvolctl
    assert cli.json("export", lab.volume, str(full1), "--format", "raw")["State"] == "completed"
    assert compare(full1, lab.expected[s1])
    lab.scribble()
    s2 = lab.snapshot()
    lab.scribble(zeros=True)
    s3 = lab.snapshot()
    lab.scribble(zeros=True)
    now = lab.copy("now")

    inc12 = lab.export("inc12", "--from", s1, "--to", s2)
    check_map(inc12["map"], lab.volume, s1, s2)
    assert inc12["map"]["fallback"] is False and inc12["changed"] == changed(inc12["map"]) > 0
    # sparse: only the changed extents' data is allocated (the rest is holes)
    assert allocated(inc12["path"]) <= changed(inc12["map"], data_only=True) + MiB
    assert allocated(inc12["path"]) < SIZE // 4 and os.path.getsize(inc12["path"]) == SIZE
    inc23 = lab.export("inc23", "--from", s2, "--to", s3)
    check_map(inc23["map"], lab.volume, s2, s3)
    assert any(e["dirty"] and e["zero"] for e in inc23["map"]["extents"])  # zeroed: changes
    inc1n = lab.export("inc1n", "--from", s1)
    check_map(inc1n["map"], lab.volume, s1, "")

    # the chain: full1 + inc12 is S2, + inc23 is S3; full1 + inc1n is now
    chain = lab.restore(full1, inc12["path"])
    assert compare(chain, lab.expected[s2])
    offline = Cli("unix:path=/nonexistent")  # restore needs no daemon
    restored = offline.json("restore-changes", str(chain), str(inc23["path"]))
    assert restored["zeroed"] == changed(inc23["map"]) - changed(inc23["map"], True) > 0
    assert restored["copied"] == changed(inc23["map"], data_only=True)
    assert restored["volume"] == lab.volume and restored["to"] == s3
    assert compare(chain, lab.expected[s3])
    assert compare(lab.restore(full1, inc1n["path"]), now)
    # negative controls: an increment onto the wrong base is neither point in time
    wrong = lab.restore(full1, inc23["path"])
    assert not compare(wrong, lab.expected[s3]) and not compare(wrong, lab.expected[s2])
    assert not compare(full1, lab.expected[s2])

    # no --from: everything, restored onto an empty file of the volume's size
    full = lab.export("full", text=True)
    assert "from the start (a full copy) to now" in full["text"], full["text"]
    check_map(full["map"], lab.volume, "", "")
    assert all(e["dirty"] for e in full["map"]["extents"])
    empty = tmp_path / "empty.raw"
    subprocess.run(["truncate", "-s", str(SIZE), str(empty)], check=True)
    assert compare(lab.restore(empty, full["path"]), now)

    # a past point in time in full; the same point in time twice: nothing changed
    full2 = lab.export("full2", "--to", s2)
    check_map(full2["map"], lab.volume, "", s2)
    assert compare(lab.restore(empty, full2["path"]), lab.expected[s2])
    same = lab.export("same", "--from", s3, "--to", s3)
    check_map(same["map"], lab.volume, s3, s3)
    assert same["changed"] == 0 and allocated(same["path"]) == 0
    assert compare(lab.restore(lab.expected[s3], same["path"]), lab.expected[s3])

    # restore's refusals
    small = tmp_path / "small.raw"
    subprocess.run(["truncate", "-s", "32M", str(small)], check=True)
    failed(cli.run("restore-changes", str(small), str(inc12["path"])), 1,
           "not a full copy")
    failed(cli.run("restore-changes", str(full1), str(tmp_path / "nothing")), 1,
           "nothing.json")
    failed(cli.run("export-changes", lab.volume, str(inc12["path"]), "--from", s1), 1,
           "AlreadyExists", "never overwrites")
    missing = "0" * 8 + "-0000-4000-8000-" + "0" * 12
    failed(cli.run("export-changes", lab.volume, str(tmp_path / "x"), "--from", missing), 1,
           "NotFound", missing)
    failed(cli.run("export-changes", lab.volume, str(tmp_path / "y"), "--from", s3, "--to",
                   s1), 1, "InvalidArgument")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob("y*"))
    lab.left_nothing_behind()

    # S2 deleted: from S2 falls back to S1, says so, and restores exactly onto S1's copy
    assert cli.json("snapshot", "delete", s2)["State"] == "completed"
    fell = lab.export("fell", "--from", s2, "--to", s3, text=True)
    assert f"snapshot {s2} is gone: fell back to {s1}" in fell["text"], fell["text"]
    check_map(fell["map"], lab.volume, s1, s3)
    assert fell["map"]["fallback"] is True
    assert compare(lab.restore(full1, fell["path"]), lab.expected[s3])
    assert compare(lab.restore(full1, lab.export("fell2", "--from", s2)["path"]), now)
    # S1 deleted too: nothing older survives; a full copy only when asked for
    assert cli.json("snapshot", "delete", s1)["State"] == "completed"
    failed(cli.run("export-changes", lab.volume, str(tmp_path / "z"), "--from", s2), 1,
           "NotFound", "full copy is needed", "full-if-needed")
    assert not list(tmp_path.glob("z*"))
    lab.left_nothing_behind()
    anyway = lab.export("anyway", "--from", s2, "--full-if-needed")
    assert anyway["map"]["fallback"] is True and anyway["map"]["from"] == ""
    assert compare(lab.restore(empty, anyway["path"]), now)


@pytest.mark.parametrize("policy", ["hostvold", "permissive"])
def test_export_changes_needs_the_admin_group(
        running: Callable[..., tuple[Host, Cli]], users: dict[str, str],  # noqa: F811
        readable_package: Path, policy: str) -> None:  # noqa: F811
    """Refused by the bus policy ("hostvold") or by the daemon's own check ("permissive");
    the files the client made are removed again, and no export ran."""
    host, cli = running(policy, readable_package)
    volume = cli.json("create", "8M")["Id"]
    cli.json("snapshot", "create", volume)
    where = Path(tempfile.mkdtemp(prefix="hostvold-changes-"))
    try:
        where.chmod(0o777)  # the users may create their files here
        for user in (users["reader"],):
            failed(cli.run("export-changes", volume, str(where / "out"), user=user), 4,
                   "permission denied")
            assert list(where.iterdir()) == []
        assert not [j for j in cli.json("jobs") if j["Operation"] == "export-changes"]
        made = cli.json("export-changes", volume, str(where / "admin"), user=users["admin"])
        assert made["from"] == "" and made["size"] == 8 * MiB
        assert servers(host) == []
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def start_export(address: str, volume: str, since: str) -> int:
    """Volume.ExportChanges over a bus connection of our own: the NBD socket, unread."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                           negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(
            destination="org.hostvold1", interface="org.hostvold1.Volume",
            path=f"/org/hostvold1/volumes/{volume.replace('-', '_')}", member="ExportChanges",
            signature="ssa{sv}", body=[since, "", {}]))
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, \
            reply and reply.body
        assert reply.signature == "ha(ttbb)a{sv}" and len(reply.unix_fds) == 1
        return reply.unix_fds[reply.body[0]]
    finally:
        bus.disconnect()


def test_daemon_killed_during_an_export(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    need(shutil.which("qemu-nbd") is not None, "qemu-nbd (Debian package qemu-utils)")
    address = bus_factory("hostvold")
    host = host_factory(1024)
    config = with_bus(host, address)
    daemon = daemon_factory(config)
    cli = Cli(address)
    lab = Lab(cli, host, tmp_path, seed=9, fmt="qcow2")  # (the chain test's is raw)
    lab.scribble()
    s1 = lab.snapshot()
    full1 = lab.expected[s1]
    lab.scribble(zeros=True)
    now = lab.copy("now")

    fd = asyncio.run(start_export(address, lab.volume, s1))
    with socket.socket(fileno=fd) as connection:
        (server,) = servers(host)
        assert (host.state_dir / "exports").is_dir() and list(
            (host.state_dir / "exports").iterdir())
        os.kill(daemon.proc.pid, signal.SIGKILL)
        assert daemon.proc.wait(10) == -signal.SIGKILL
        # the server dies with the daemon (parent-death signal): its end of our connection
        # closes, after the greeting it sent at once
        connection.settimeout(10)
        while connection.recv(65536):
            pass
    assert server not in servers(host) and servers(host) == []

    daemon_factory(config)  # the same configuration, state directory and shares
    exports = host.state_dir / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []
    show = cli.json("show", lab.volume)
    assert show["State"] == "available" and show["Problems"] == [], show
    again = lab.export("after-crash", "--from", s1)
    check_map(again["map"], lab.volume, s1, "")
    assert compare(lab.restore(full1, again["path"]), now)
    lab.left_nothing_behind()


def test_man_page_and_completion(running: Callable[..., tuple[Host, Cli]],  # noqa: F811
                                 tmp_path: Path) -> None:
    generate(tmp_path)
    page = subprocess.run(["man", "-l", str(tmp_path / "hostvolctl.1")], capture_output=True,
                          text=True, env=dict(os.environ, MANWIDTH="200", PAGER="cat"))
    assert page.returncode == 0 and not page.stderr.strip(), page.stderr
    for words in ("hostvolctl export-changes [-h] [--from SNAPSHOT] [--to SNAPSHOT] "
                  "[--full-if-needed] VOL OUTPUT", "hostvolctl restore-changes [-h] BASE "
                  "INCREMENT", "extents: [{start, length, dirty, zero}]", "punched as a hole"):
        assert words in " ".join(page.stdout.split()), words
    _, cli = running()
    shim = tmp_path / "bin"
    shim.mkdir()  # `hostvolctl` as the completion calls it: this checkout's client
    (shim / "hostvolctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m hostvold.client "
                                     '"$@"\n')
    (shim / "hostvolctl").chmod(0o755)
    env = dict(os.environ, HOSTVOLD_BUS=cli.address, PATH=f"{shim}:{os.environ['PATH']}")
    script = tmp_path / "hostvolctl"
    assert complete(script, ["hostvolctl", "export-"], env) == ["export-changes"]
    assert complete(script, ["hostvolctl", "restore"], env) == ["restore-changes"]
    volume = cli.json("create", "1M")["Id"]
    snapshot = cli.json("snapshot", "create", volume)["Id"]
    assert complete(script, ["hostvolctl", "export-changes", ""], env) == [volume]
    assert complete(script, ["hostvolctl", "export-changes", "--f"], env) == [
        "--from", "--full-if-needed"]
    for option in ("--from", "--to"):
        assert complete(script, ["hostvolctl", "export-changes", volume, option, ""],
                        env) == [snapshot]
    (tmp_path / "backup-1.raw").write_bytes(b"")
    prefix = str(tmp_path / "backup-")
    assert complete(script, ["hostvolctl", "export-changes", "--from", snapshot, volume,
                             prefix], env) == [f"{prefix}1.raw"]
    for line in (["hostvolctl", "restore-changes", prefix],
                 ["hostvolctl", "restore-changes", "base.raw", prefix]):
        assert complete(script, line, env) == [f"{prefix}1.raw"], line

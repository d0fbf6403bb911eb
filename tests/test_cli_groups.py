"""`hostvolctl group` (SPEC section 5a): group snapshots through the real client, against a
real daemon process on a real private dbus-daemon, with real bytes on a loop-mounted share
and real users for authorization. Also: the GroupSnapshot interface's introspection against
the committed XML, and the man page and bash completion of the group commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Host
from tests.snapshot_lab import qemu_io
from tests.test_cli_docs import complete, generate
from tests.test_dbus import (  # noqa: F401  (fixtures)
    INTROSPECTION,
    Cli,
    _call,
    _client,
    _interfaces,
    readable_package,
    running,
    users,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
BEFORE, AFTER = 0x11, 0x22  # written before and after the group's point in time


def object_id(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


def write(cli: Cli, volume_id: str, pattern: int) -> None:
    """``pattern`` over the volume's first MiB, through its active file (detached)."""
    info = cli.json("connection-info", volume_id)
    qemu_io(Path(info["path"]), info["format"], [f"write -P {pattern} 0 1M"])


def holds(cli: Cli, volume_id: str, pattern: int) -> None:
    info = cli.json("connection-info", volume_id)
    qemu_io(Path(info["path"]), info["format"], [f"read -P {pattern} 0 1M"], read_only=True)


def failed(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The command failed with ``code`` and one sentence holding ``words``, no traceback."""
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("hostvolctl: ") and result.stderr.count("\n") == 1
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_group_create_list_show_volumes_revert_delete(
        running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    _, cli = running()
    vids = [cli.json("create", "64M")["Id"] for _ in range(2)]
    for vid in vids:
        write(cli, vid, BEFORE)

    group = cli.json("group", "create", *vids)
    gid = group["Id"]
    assert group["path"] == f"/org/hostvold1/groups/{gid.replace('-', '_')}"
    assert sorted(object_id(p) for p in group["Volumes"]) == sorted(vids)
    assert len(group["Snapshots"]) == 2
    assert group["Consistency"] == "crash" and group["Problems"] == []
    assert group["Paused"] == 0 and group["Created"]
    job = cli.json("job", group["job"])
    assert job["Operation"] == "create-group-snapshot" and job["State"] == "completed"
    assert job["Objects"][-1] == group["path"]

    # each member is an ordinary snapshot of its volume
    members = {object_id(p) for p in group["Snapshots"]}
    for vid in vids:
        snaps = cli.json("snapshots", vid)
        assert len(snaps) == 1 and snaps[0]["Id"] in members
    assert {s["Id"] for s in cli.json("snapshots")} == members

    listed = cli.json("group", "list")
    assert [g["Id"] for g in listed] == [gid] and listed[0]["path"] == group["path"]
    table = cli.run("group", "list")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["GROUP", "CREATED", "CONSISTENCY", "QUIESCED", "MEMBERS",
                              "PROBLEMS"]
    assert row.split()[0] == gid and row.split()[2:] == ["crash", "no", "2"]

    shown = cli.json("group", "show", gid)
    assert shown == {k: v for k, v in group.items() if k != "job"}
    assert cli.json("group", "show", group["path"]) == shown  # an object path works too
    text = cli.run("group", "show", gid)
    assert text.returncode == 0, text.stderr
    lines = {line[:11].strip(): line[12:] for line in text.stdout.splitlines()}
    assert sorted(lines["Volumes"].split()) == sorted(vids)
    assert lines["Id"] == gid and lines["Consistency"] == "crash"
    assert lines["Problems"] == "" and lines["Quiesced"] == "False"

    for vid in vids:  # after the point in time
        write(cli, vid, AFTER)
        holds(cli, vid, AFTER)

    made = cli.json("group", "create-volumes", gid)
    assert len(made) == 2 and not {v["Id"] for v in made} & set(vids)
    for volume in made:
        assert volume["Size"] == 64 * MiB and volume["State"] == "available"
        assert volume["job"] == made[0]["job"]
        holds(cli, volume["Id"], BEFORE)
        assert cli.json("snapshots", volume["Id"]) == []
    assert cli.json("job", made[0]["job"])["Operation"] == "create-volumes-from-group"
    assert sorted(v["Id"] for v in cli.json("volumes")) == sorted(
        [*vids, *(v["Id"] for v in made)])
    words = cli.run("group", "create-volumes", gid)
    assert words.returncode == 0, words.stderr
    assert len(words.stdout.splitlines()) == 2 and "64.0 MiB raw" in words.stdout

    reverted = cli.json("group", "revert", gid)
    assert reverted["State"] == "completed"
    assert reverted["Operation"] == "revert-group-snapshot"
    for vid in vids:
        holds(cli, vid, BEFORE)
    assert cli.json("group", "show", gid)["Problems"] == []

    deleted = cli.json("group", "delete", gid)
    assert deleted["State"] == "completed"
    assert deleted["Operation"] == "delete-group-snapshot"
    assert cli.json("group", "list") == []
    for vid in vids:
        assert cli.json("snapshots", vid) == []
        holds(cli, vid, BEFORE)  # a delete keeps the data
    failed(cli.run("group", "show", gid), 1, "NotFound", gid)
    assert len(cli.json("volumes")) == 6  # the copies are standalone volumes


def test_group_no_wait_and_options(
        running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    _, cli = running()
    vid = cli.json("create", "8M")["Id"]
    started = cli.run("--no-wait", "group", "create", "--consistency", "suspend", vid)
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    assert job.startswith("/org/hostvold1/jobs/")
    props = cli.job_ended(job)
    assert props["State"] == "completed", props
    (group,) = cli.json("group", "list")
    assert props["Objects"][-1] == group["path"]
    assert group["Consistency"] == "suspend" and group["Problems"] == []
    deleting = json.loads(cli.run("--json", "--no-wait", "group", "delete", group["Id"]).stdout)
    assert deleting["job"].startswith("/org/hostvold1/jobs/")
    assert cli.job_ended(deleting["job"])["State"] == "completed"
    assert cli.json("group", "list") == [] and cli.json("snapshots", vid) == []


def test_group_errors(running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    _, cli = running()
    vid = cli.json("create", "4M")["Id"]
    failed(cli.run("group", "create"), 1, "InvalidArgument",
           "needs volumes, a domain or domains")
    failed(cli.run("group", "create", "--consistency", "quiesced", "--quiesce", "never", vid),
           1, "InvalidArgument", "quiesce=never")
    missing = str(uuid.uuid4())
    failed(cli.run("group", "create", vid, missing), 1, "NotFound", missing)
    failed(cli.run("group", "create", "not a volume"), 1, "InvalidArgument", "not a volume")
    for action in ("show", "delete", "revert", "create-volumes"):
        failed(cli.run("group", action, missing), 1, "NotFound", f"group {missing}")
    failed(cli.run("group", "show", "no such/group"), 1, "InvalidArgument")
    assert cli.run("group", "create", "--consistency", "eventual", vid).returncode == 2
    assert cli.run("group").returncode == 2
    assert cli.json("group", "list") == [] and cli.json("snapshots", vid) == []
    gid = cli.json("group", "create", vid)["Id"]
    failed(cli.run("group", "create-volumes", gid, "--share", "nowhere"), 1, "NotFound",
           "share 'nowhere' is not configured")
    assert cli.json("snapshot", "create", vid)["Id"]  # the group is no longer the newest
    failed(cli.run("group", "revert", gid), 1, "InvalidState", "not its newest")


@pytest.mark.parametrize("policy", ["hostvold", "permissive"])
def test_group_changes_need_the_admin_group(
        running: Callable[..., tuple[Host, Cli]], users: dict[str, str],  # noqa: F811
        readable_package: Path, policy: str) -> None:  # noqa: F811
    """A user outside the admin group reads groups and changes none (exit 4): refused by the
    bus policy ("hostvold") or by the daemon's own check, NotAuthorized ("permissive")."""
    _, cli = running(policy, readable_package)
    vid = cli.json("create", "4M")["Id"]
    gid = cli.json("group", "create", vid)["Id"]
    reader = users["reader"]
    assert [g["Id"] for g in cli.json("group", "list", user=reader)] == [gid]
    assert cli.json("group", "show", gid, user=reader)["Id"] == gid
    for args in (["group", "create", vid], ["group", "delete", gid], ["group", "revert", gid],
                 ["group", "create-volumes", gid]):
        failed(cli.run(*args, user=reader), 4, "permission denied")
    assert [g["Id"] for g in cli.json("group", "list")] == [gid]
    assert len(cli.json("volumes")) == 1 and len(cli.json("snapshots")) == 1
    assert cli.json("group", "create", vid, user=users["admin"])["Problems"] == []


async def test_group_introspection_matches_committed_xml(
        running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    """As tests/test_dbus.py does for the other interfaces (HOSTVOLD_WRITE_INTROSPECTION=1
    writes the file to review and commit)."""
    _, cli = running()
    group = cli.json("group", "create", cli.json("create", "1M")["Id"])
    bus = await _client(cli.address)
    (xml_text,) = await _call(bus, group["path"], "org.freedesktop.DBus.Introspectable",
                              "Introspect")
    bus.disconnect()
    exported = _interfaces(xml_text)
    assert set(exported) == {"org.hostvold1.GroupSnapshot"}
    path = INTROSPECTION / "org.hostvold1.GroupSnapshot.xml"
    if os.environ.get("HOSTVOLD_WRITE_INTROSPECTION") == "1":
        path.write_text(exported["org.hostvold1.GroupSnapshot"])
        pytest.fail(f"introspection XML written to {path}: review and commit it")
    assert exported["org.hostvold1.GroupSnapshot"] == path.read_text()


def test_group_man_page_and_completion(
        running: Callable[..., tuple[Host, Cli]], tmp_path: Path) -> None:  # noqa: F811
    generate(tmp_path)
    page = subprocess.run(["man", "-l", str(tmp_path / "hostvolctl.1")], capture_output=True,
                          text=True, env=dict(os.environ, MANWIDTH="200", PAGER="cat"))
    assert page.returncode == 0 and not page.stderr.strip(), page.stderr
    for usage in ("hostvolctl group create [-h] [--domain DOM]", "hostvolctl group list",
                  "hostvolctl group show [-h] group", "hostvolctl group delete [-h] group",
                  "hostvolctl group revert [-h] group",
                  "hostvolctl group create-volumes [-h] [--share SHARE] group"):
        assert usage in page.stdout, usage
    _, cli = running()
    shim = tmp_path / "bin"
    shim.mkdir()  # `hostvolctl` as the completion calls it: this checkout's client
    (shim / "hostvolctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m hostvold.client "
                                     '"$@"\n')
    (shim / "hostvolctl").chmod(0o755)
    env = dict(os.environ, HOSTVOLD_BUS=cli.address, PATH=f"{shim}:{os.environ['PATH']}")
    script = tmp_path / "hostvolctl"
    assert complete(script, ["hostvolctl", "gr"], env) == ["group"]
    assert complete(script, ["hostvolctl", "group", ""], env) == [
        "create", "list", "show", "delete", "revert", "create-volumes"]
    assert complete(script, ["hostvolctl", "group", "cr"], env) == ["create",
                                                                   "create-volumes"]
    assert complete(script, ["hostvolctl", "group", "create", "--c"], env) == [
        "--consistency"]
    assert complete(script, ["hostvolctl", "group", "create", "--consistency", ""], env) == [
        "crash", "quiesced", "suspend"]
    assert complete(script, ["hostvolctl", "group", "create", "--quiesce", "r"],
                    env) == ["require"]
    vids = sorted(cli.json("create", "1M")["Id"] for _ in range(2))
    for line in (["hostvolctl", "group", "create", ""],
                 ["hostvolctl", "group", "create", "--domain", "vm", vids[0], ""],
                 ["hostvolctl", "--json", "group", "create", "--consistency", "crash", ""]):
        assert sorted(complete(script, line, env)) == vids, line
    gid = cli.json("group", "create", *vids)["Id"]
    for action in ("show", "delete", "revert", "create-volumes"):
        assert complete(script, ["hostvolctl", "group", action, ""], env) == [gid]
    assert complete(script, ["hostvolctl", "group", "create-volumes", gid, "--s"],
                    env) == ["--share"]
    assert complete(script, ["hostvolctl", "group", "show", gid, ""], env) == []
    # the commands before stay as they were
    assert complete(script, ["hostvolctl", "snapshot", "create", "--id", "x", ""],
                    env) == vids
    assert complete(script, ["hostvolctl", "create", "1M", "--format", ""], env) == [
        "raw", "qcow2"]

"""The ObjectManager's signals as clients no one here wrote see them: GLib's
``Gio.DBusObjectManagerClient`` (Debian's python3-gi) follows volumes, snapshots and jobs
as they appear and vanish, and ``gdbus monitor`` (libglib2.0-bin) shows InterfacesAdded
and InterfacesRemoved sent from the manager's path, ``/org/hostvold1``, naming the object
in their first argument, as the D-Bus specification has them. Each change is signalled
once (``hostvolctl monitor`` counts them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import REPO, Host, need
from tests.test_dbus import Cli, running  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
ROOT = "/org/hostvold1"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi (the venv has no gi)
KEEP_JOBS = 4.0  # seconds the daemon keeps a finished job here (600 s by default)

# the daemon forgets finished jobs after KEEP_JOBS seconds, so the test sees them vanish
SITECUSTOMIZE = f"""\
from hostvold.ops import jobs
jobs.JobRunner.__init__.__defaults__ = ({KEEP_JOBS},)
"""

GLIB_CLIENT = """\
import json, os, sys
import gi
gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib

flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
connection = Gio.DBusConnection.new_for_address_sync(sys.argv[1], flags, None, None)
manager = Gio.DBusObjectManagerClient.new_sync(
    connection, Gio.DBusObjectManagerClientFlags.NONE, "org.hostvold1", "/org/hostvold1",
    None, None, None)
events = []

def seen(kind):
    def record(_manager, obj):
        events.append({"event": kind, "path": obj.get_object_path(),
                       "interfaces": sorted(i.get_interface_name()
                                            for i in obj.get_interfaces())})
    return record

manager.connect("object-added", seen("added"))
manager.connect("object-removed", seen("removed"))
loop = GLib.MainLoop()

def stdin_closed(fd, _condition):
    if os.read(fd, 1024):
        return True
    loop.quit()
    return False

GLib.io_add_watch(0, GLib.PRIORITY_DEFAULT, GLib.IOCondition.IN | GLib.IOCondition.HUP,
                  stdin_closed)
GLib.timeout_add_seconds(int(sys.argv[2]), loop.quit)
print(json.dumps({"ready": sorted(o.get_object_path() for o in manager.get_objects())}),
      flush=True)
loop.run()
print(json.dumps(events), flush=True)
"""


def path_of(kind: str, object_id: str) -> str:
    return f"{ROOT}/{kind}/{object_id.replace('-', '_')}"


def first_line(stream: IO[str] | None, what: str) -> str:
    assert stream is not None
    line = stream.readline()
    assert line, f"{what} said nothing"
    return line


def test_independent_clients_follow_objects(
        running: Callable[..., tuple[Host, Cli]], tmp_path: Path) -> None:  # noqa: F811
    need(Path(SYSTEM_PYTHON).exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('Gio', '2.0')"],
        capture_output=True).returncode == 0, "python3-gi (Debian package)")
    need(shutil.which("gdbus") is not None, "gdbus (Debian package libglib2.0-bin)")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # the checkout first: sitecustomize imports hostvold before ``-m`` puts it on the path
    _, cli = running(env={"PYTHONPATH": f"{REPO}{os.pathsep}{custom}"})
    script = tmp_path / "glib_client.py"
    script.write_text(GLIB_CLIENT)
    glib = subprocess.Popen([SYSTEM_PYTHON, str(script), cli.address, "120"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    gdbus_out = tmp_path / "gdbus.out"
    with open(gdbus_out, "w") as out:
        gdbus = subprocess.Popen(["gdbus", "monitor", "--address", cli.address,
                                  "--dest", "org.hostvold1", "--object-path", ROOT],
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    monitor = subprocess.Popen([sys.executable, "-m", "hostvold.client", "--json", "monitor"],
                               env=dict(os.environ, HOSTVOLD_BUS=cli.address),
                               stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        ready = json.loads(first_line(glib.stdout, "the GLib client"))["ready"]
        assert not any(p.startswith(f"{ROOT}/volumes/") for p in ready)
        assert json.loads(first_line(monitor.stdout, "hostvolctl monitor"))["event"] \
            == "monitoring"
        deadline = time.monotonic() + 10  # gdbus subscribes, then asks who owns the name
        while "is owned by" not in gdbus_out.read_text():
            assert time.monotonic() < deadline, gdbus_out.read_text()
            time.sleep(0.05)

        volume = cli.json("create", "8M")["Id"]
        snapshot = cli.json("snapshot", "create", volume)["Id"]
        cli.json("snapshot", "delete", snapshot)
        cli.json("delete", volume)
        deadline = time.monotonic() + KEEP_JOBS + 20
        while cli.json("jobs"):  # until every finished job is forgotten
            assert time.monotonic() < deadline, cli.json("jobs")
            time.sleep(0.2)
        time.sleep(0.5)  # the last InterfacesRemoved on its way to the clients
    finally:
        glib_out, _ = glib.communicate(timeout=30)  # stdin closed: it prints what it saw
        gdbus.terminate()
        gdbus.wait(10)
        monitor.terminate()
        monitor_out, _ = monitor.communicate(timeout=10)

    events: list[dict[str, Any]] = json.loads(glib_out.strip().splitlines()[-1])
    added = {e["path"]: e["interfaces"] for e in events if e["event"] == "added"}
    removed = {e["path"]: e["interfaces"] for e in events if e["event"] == "removed"}
    volume_path, snapshot_path = path_of("volumes", volume), path_of("snapshots", snapshot)
    assert added.get(volume_path) == ["org.hostvold1.Volume"], events
    assert added.get(snapshot_path) == ["org.hostvold1.Snapshot"], events
    assert removed.get(volume_path) == ["org.hostvold1.Volume"], events
    assert removed.get(snapshot_path) == ["org.hostvold1.Snapshot"], events
    jobs = [path for path, names in added.items() if names == ["org.hostvold1.Job"]]
    assert len(jobs) >= 3, events  # create the volume, delete the snapshot, the volume
    assert all(removed.get(job) == ["org.hostvold1.Job"] for job in jobs), events
    assert ROOT not in added and ROOT not in removed

    text = gdbus_out.read_text()
    assert f"{ROOT}: org.freedesktop.DBus.ObjectManager.InterfacesAdded " \
           f"(objectpath '{volume_path}', " in text, text
    assert f"{ROOT}: org.freedesktop.DBus.ObjectManager.InterfacesRemoved " \
           f"(objectpath '{snapshot_path}', ['org.hostvold1.Snapshot'])" in text, text

    seen = [json.loads(line) for line in monitor_out.splitlines()]
    for kind, object_id in (("volume", volume), ("snapshot", snapshot)):
        for event in ("added", "removed"):
            assert sum(e["kind"] == kind and e["id"] == object_id and e["event"] == event
                       for e in seen) == 1, (kind, event, seen)
    job_ids = [path.rsplit("/", 1)[1].replace("_", "-") for path in jobs]
    for job_id in job_ids:
        for event in ("added", "removed"):
            assert sum(e["kind"] == "job" and e["id"] == job_id and e["event"] == event
                       for e in seen) == 1, (job_id, event, seen)

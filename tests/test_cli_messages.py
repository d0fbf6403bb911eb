"""What a new user reads from hostvolctl (issue 14): every form of "the daemon is not
there" is exit 3 with one sentence saying what to start; a missing object is NotFound
naming it. The real client against a real dbus-daemon (and a real daemon)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonProcess, Host, PrivateBus
from tests.test_dbus import Cli, with_bus

NOT_RUNNING = 3


def test_every_form_of_not_running_is_exit_3(tmp_path: Path) -> None:
    no_socket = Cli(f"unix:path={tmp_path / 'no-bus-here'}").run("status")
    assert no_socket.returncode == NOT_RUNNING, no_socket.stderr
    assert "is hostvold running" in no_socket.stderr

    nobody = PrivateBus("")
    services = tmp_path / "services"
    services.mkdir()
    (services / "org.hostvold1.service").write_text(  # activation that cannot work here
        "[D-BUS Service]\nName=org.hostvold1\nExec=/bin/false\nUser=root\n")
    failing = PrivateBus(f"<servicedir>{services}</servicedir>")
    try:
        unowned = Cli(nobody.address).run("status")
        assert unowned.returncode == NOT_RUNNING, unowned.stderr
        assert "hostvold is not running" in unowned.stderr
        assert "systemctl start hostvold" in unowned.stderr
        spawned = Cli(failing.address).run("status")
        assert spawned.returncode == NOT_RUNNING, spawned.stderr
        assert "could not start it" in spawned.stderr, spawned.stderr
        assert "Traceback" not in spawned.stderr + unowned.stderr + no_socket.stderr
        print(f"\n{no_socket.stderr}{unowned.stderr}{spawned.stderr}")
    finally:
        nobody.close()
        failing.close()


def test_a_missing_object_is_not_found_with_its_id(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(128), address))
    cli = Cli(address)
    missing = str(uuid.uuid4())
    for command in (["show", missing], ["delete", missing], ["snapshots", missing],
                    ["snapshot", "delete", missing], ["job", missing]):
        result = cli.run(*command)
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.startswith("hostvolctl: NotFound:"), (command, result.stderr)
        assert missing in result.stderr, (command, result.stderr)


def test_the_commands_are_on_the_default_path() -> None:
    """After `bash .ci/setup`, a login shell finds both commands (no venv to activate)."""
    import subprocess
    for command in ("hostvolctl", "hostvold"):
        found = subprocess.run(["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                "/usr/bin:/sbin:/bin", command, "--version"],
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 0, (command, found.stderr)
        assert "hostvol" in found.stdout + found.stderr


def test_connection_info_says_how_to_open_the_volume(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Volume.ConnectionInfo (SPEC section 9): what another tool needs, as Cinder's
    initialize_connection gives it for NFS, plus the path on this host; it follows the
    active file."""
    import json
    import subprocess
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(128), address))
    cli = Cli(address)
    volume = cli.json("create", "16M")["Id"]
    before = cli.json("connection-info", volume)
    assert before["format"] == "raw" and before["driver_volume_type"] == "ext4"
    assert Path(before["path"]) == Path(before["mount_point"]) / before["name"]
    cli.json("snapshot", "create", volume)
    after = cli.json("connection-info", volume)
    assert after["format"] == "qcow2" and after["name"] != before["name"]
    assert after["export"] == before["export"] and after["name"].startswith(before["name"])
    info = json.loads(subprocess.run(  # what another tool does with it
        ["qemu-img", "info", "-U", "--output=json", "-f", after["format"], after["path"]],
        check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 16 << 20
    text = cli.run("connection-info", volume).stdout
    assert f"path               {after['path']}" in text


def test_monitor_streams_what_changes(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """`hostvolctl monitor` prints every change from signals: objects added and removed,
    properties, jobs completed; it stops on SIGTERM."""
    import json
    import os
    import subprocess
    import sys
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(128), address))
    cli = Cli(address)
    monitor = subprocess.Popen([sys.executable, "-m", "hostvold.client", "--json", "monitor"],
                               env=dict(os.environ, HOSTVOLD_BUS=address),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert monitor.stdout is not None
        assert json.loads(monitor.stdout.readline())["event"] == "monitoring"
        volume = cli.json("create", "8M")["Id"]
        snapshot = cli.json("snapshot", "create", volume)["Id"]
        cli.json("snapshot", "delete", snapshot)
        cli.json("delete", volume)
    finally:
        monitor.terminate()
        out, err = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    seen = {(e["kind"], e["id"], e["event"]) for e in events}
    assert ("volume", volume, "added") in seen, events
    assert ("snapshot", snapshot, "added") in seen and ("snapshot", snapshot, "removed") in seen
    assert ("volume", volume, "removed") in seen
    assert any(e["kind"] == "job" and e["event"] == "completed" for e in events)
    assert any(e["kind"] == "volume" and e["event"] == "changed"
               and "Snapshots" in e["changes"] for e in events)


def test_attach_and_live_snapshot_on_the_embedded_defaults(
        shared_base: Path, domain: str, bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """No share configured: the embedded local share inside the state directory. QEMU's
    user reaches it (the state directory lets others pass, not list), so attaching to a
    running domain and a live snapshot work with no extra configuration."""
    import stat as stat_module
    address = bus_factory("hostvold")
    state = shared_base / f"state-{uuid.uuid4().hex[:8]}"
    config = shared_base / f"{state.name}.conf"
    config.write_text(f"[daemon]\nstate_dir = {state}\nbus = {address}\n")
    daemon_factory(config)
    mode = state.stat().st_mode
    assert mode & stat_module.S_IXOTH and not mode & stat_module.S_IROTH  # pass, not list
    assert (state / "index.sqlite").stat().st_mode & 0o077 == 0
    cli = Cli(address)
    volume = cli.json("create", "8M")["Id"]
    assert cli.json("attach", volume, domain)["State"] == "in-use"
    snapshot = cli.json("snapshot", "create", volume)["Id"]
    assert cli.json("connection-info", volume)["name"].endswith(snapshot)
    assert cli.json("detach", volume)["State"] == "available"


def test_the_demo_runs(shared_base: Path, libvirtd: str, bus_factory: Callable[[str], str],
                       daemon_factory: Callable[..., DaemonProcess]) -> None:
    """`bash .ci/setup demo` runs .ci/demo.py against the running daemon: here a daemon on
    the embedded defaults (a state directory of its own) on a private bus."""
    import subprocess
    import sys
    address = bus_factory("hostvold")
    state = shared_base / f"demo-{uuid.uuid4().hex[:8]}"
    config = shared_base / f"{state.name}.conf"
    config.write_text(f"[daemon]\nstate_dir = {state}\nbus = {address}\n")
    daemon_factory(config)
    demo = Path(__file__).resolve().parent.parent / ".ci" / "demo.py"
    done = subprocess.run([sys.executable, str(demo), "--bus", address], capture_output=True,
                          text=True, timeout=600)
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the guest read back all" in done.stdout and "demo done" in done.stdout
    assert "quiesced (the guest agent froze the filesystem): True" in done.stdout
    assert "longest stall the guest saw" in done.stdout

"""hostvolctl's start (P15): a reading command loads neither the configuration's models
(pydantic) nor the event loop nor dbus_fast's bus layers; the completion's ids come from
`hostvolctl __complete`; a reader that closes the pipe ends hostvolctl quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from tests.conftest import DaemonProcess, Host
from tests.test_dbus import Cli, with_bus

# runs a command as hostvolctl does, then prints the modules it loaded
LOADED = ("import sys\nfrom hostvold.client.main import main\ncode = main(sys.argv[1:])\n"
          "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\nsys.exit(code)\n")
HEAVY = ("pydantic", "hostvold.core.config", "hostvold.core.models", "asyncio",
         "dbus_fast.aio", "dbus_fast.message_bus", "dbus_fast.service", "libvirt")


def test_reading_commands_load_only_what_they_use(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(64), address))
    volume = Cli(address).json("create", "1M")["Id"]
    env = dict(os.environ, HOSTVOLD_BUS=address)
    for args in (["status"], ["volumes"], ["--json", "show", volume], ["snapshots"],
                 ["__complete", "volumes"]):
        done = subprocess.run([sys.executable, "-c", LOADED, *args], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, (args, done.stderr)
        loaded = set(done.stderr.split())
        assert not [m for m in HEAVY if m in loaded], (args, [m for m in HEAVY if m in loaded])
    ids = subprocess.run([sys.executable, "-m", "hostvold.client", "__complete", "volumes"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert ids.returncode == 0 and ids.stdout == f"{volume}\n" and not ids.stderr


def test_closed_pipe_ends_quietly(host_factory: Callable[..., Host],
                                  bus_factory: Callable[[str], str],
                                  daemon_factory: Callable[..., DaemonProcess]) -> None:
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(64), address))
    cli = Cli(address)
    volume = cli.json("create", "1M")["Id"]
    for _ in range(20):  # lines enough that some are written after the reader left
        cli.json("snapshot", "create", volume)
    env = dict(os.environ, HOSTVOLD_BUS=address)
    for args in (["--json", "show", volume], ["--json", "snapshots"], ["snapshots"],
                 ["--json", "snapshots", volume]):
        shell = (f"{sys.executable} -m hostvold.client {' '.join(args)} 2>{{err}} | head -c1 "
                 ">/dev/null; echo ${{PIPESTATUS[0]}}")
        for reader in ("head -c1", "true"):  # reads one byte; reads nothing
            err = f"/tmp/hostvolctl-pipe-{os.getpid()}"
            done = subprocess.run(["bash", "-c", shell.format(err=err).replace(
                "head -c1", reader)], capture_output=True, text=True, env=env, timeout=60)
            with open(err) as stderr:
                message = stderr.read()
            os.unlink(err)
            assert done.stdout.strip() in ("0", "141"), (args, reader, done.stdout, message)
            assert message == "", (args, reader, message)


def test_command_without_daemon_still_reports(tmp_path: object) -> None:
    """The blocking connection maps an unreachable bus as the full one does (exit 3)."""
    env = dict(os.environ, HOSTVOLD_BUS="unix:path=/nonexistent/hostvold-bus")
    for args in (["status"], ["--json", "show", "x"], ["volumes"]):
        done = subprocess.run([sys.executable, "-m", "hostvold.client", *args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 3, (args, done.stderr)
        assert done.stderr.startswith("hostvolctl: cannot reach the D-Bus"), done.stderr

"""The daemon process: ready through sd_notify, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, PrivateBus


def test_default_config_becomes_ready_and_stops_on_sigterm(tmp_path: Path,
                                                           dbus_daemon: str) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    config = tmp_path / "hostvold.conf"
    config.write_text(f"[daemon]\nstate_dir = {tmp_path / 'state'}\nbus = {dbus_daemon}\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen([sys.executable, "-m", "hostvold", "--config", str(config)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
        state = tmp_path / "state"
        assert (state / "share").is_dir()  # the embedded default share
        assert (state / "index.sqlite").exists()
        # others may pass (QEMU's user reaches the default share) but not list; the index
        # stays the daemon's own
        assert state.stat().st_mode & 0o777 == 0o711
        assert (state / "index.sqlite").stat().st_mode & 0o777 == 0o600
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=2) == 0
        elapsed = time.monotonic() - sent
        assert elapsed < 2
        listener.settimeout(1)
        assert "STOPPING=1" in listener.recv(4096).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        listener.close()


def test_cli_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.conf"
    good.write_text("[volumes]\nqcow2_volumes = true\n")
    bad = tmp_path / "bad.conf"
    bad.write_text("[volumes]\nqcow2_volumes = sometimes\n")
    cli = [sys.executable, "-m", "hostvold.client"]
    ok = subprocess.run([*cli, "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    failed = subprocess.run([*cli, "check-config", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 78
    assert "[volumes] qcow2_volumes = 'sometimes'" in failed.stderr


def test_journal_gets_structured_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run by systemd (JOURNAL_STREAM set), log records go to the journal with VOLUME_ID etc."""
    import logging

    from hostvold.server.daemon import setup_logging
    from systemd import journal

    sent: list[dict[str, object]] = []
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    monkeypatch.setattr(journal, "send", lambda MESSAGE, **fields: sent.append(
        {"MESSAGE": MESSAGE, **fields}))
    setup_logging("info")
    try:
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, journal.JournalHandler)
        handler.send = journal.send  # the handler bound send at creation
        logging.getLogger("hostvold.test").info(
            "deleted snapshot", extra={"VOLUME_ID": "v-1", "SNAPSHOT_ID": "s-1"})
    finally:
        logging.basicConfig(force=True, handlers=[logging.StreamHandler()])
    assert sent and sent[-1]["MESSAGE"] == "deleted snapshot"
    assert sent[-1]["VOLUME_ID"] == "v-1" and sent[-1]["SNAPSHOT_ID"] == "s-1"
    assert sent[-1]["SYSLOG_IDENTIFIER"] == "hostvold"


def test_a_daemon_whose_bus_goes_away_stops_with_status_1(tmp_path: Path,
                                                          dbus_daemon: str) -> None:
    """dbus-daemon restarted (an upgrade of dbus, a crash): the daemon's connection is gone
    for good and no caller can reach it. It stops as on SIGTERM and exits 1, so systemd
    (Restart=on-failure) starts it again on the new bus; before, it ran on deaf."""
    bus = PrivateBus("")  # one of its own: this test ends it
    config = tmp_path / "hostvold.conf"
    config.write_text(f"[daemon]\nstate_dir = {tmp_path / 'state'}\nbus = {bus.address}\n")
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        bus.proc.kill()
        assert daemon.proc.wait(timeout=15) == 1
        text = daemon.log_text()
        assert "lost the D-Bus connection" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        daemon.stop()
        bus.close()

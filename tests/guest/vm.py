"""The test guest as a running domain: booted from the image of ``image.py``, watched
through its serial console, driven through its guest agent.

The guest reports everything on its console (see ``init`` and ``guestio.c``), which libvirt
appends to a file here; reading that file asks nothing of the guest, so it works while the
guest is frozen, its agent hung or its disk gone.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

from tests.guest.image import GuestImage

GUEST_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 loglevel=4 panic=-1 {params}</cmdline></os>
  <features><acpi/><tcg><tb-cache unit='MiB'>64</tb-cache></tcg></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='virtio-serial' index='0'/>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


# libvirt prints every error to stderr unless a handler is set; the errors asked for here
# (an agent not connected yet while waiting for it) are answers, not news
libvirt.registerErrorHandler(lambda _context, _error: None, None)


class GuestFailed(AssertionError):
    """The guest did not do what a test waited for (its console tail is in the message)."""


def wait_for(what: str, predicate: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise GuestFailed(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class RealGuest:
    name: str
    console: Path
    uri: str = "qemu:///system"

    # ---- the console ------------------------------------------------------------------------

    def offset(self) -> int:
        """Where the console log ends now: a mark for lines() and longest_gap_ms()."""
        return self.console.stat().st_size if self.console.exists() else 0

    def lines(self, since: int = 0) -> list[str]:
        if not self.console.exists():
            return []
        with open(self.console, "rb") as log:
            log.seek(since)
            data = log.read()
        # a line still being written is not one yet
        return [line.strip() for line in data.decode(errors="replace").split("\n")[:-1]]

    def tail(self, count: int = 15) -> str:
        return "\n".join(self.lines()[-count:])

    def acked(self, serial: str, since: int = 0) -> int:
        """The last record the writer on ``serial`` saw made durable (-1: none yet)."""
        last = -1
        for line in self.lines(since):
            parts = line.split()
            if len(parts) == 3 and parts[0] == "A" and parts[1] == serial:
                last = int(parts[2])
        return last

    def failed(self, serial: str, since: int = 0) -> str | None:
        for line in self.lines(since):
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("E", "X") and parts[1] == serial:
                return line
        return None

    def wait_acked(self, serial: str, beyond: int, seconds: float = 60, since: int = 0) -> int:
        """Waits until the writer acknowledged a record after ``beyond``; returns the last."""
        def moved() -> bool:
            problem = self.failed(serial, since)
            if problem:
                raise GuestFailed(f"the writer on {serial} stopped: {problem}\n{self.tail()}")
            return self.acked(serial, since) > beyond
        try:
            wait_for(f"a record after {beyond} on {serial}", moved, seconds)
        except GuestFailed as exc:
            raise GuestFailed(f"{exc}\n{self.tail()}") from None
        return self.acked(serial, since)

    def gaps_ms(self, serial: str, start: int, end: int | None = None) -> list[float]:
        """The probe's longest gap of each 100 ms period, reported between two offsets."""
        with open(self.console, "rb") as log:
            log.seek(start)
            chunk = log.read(-1 if end is None else end - start).decode(errors="replace")
        return [int(p[3]) / 1000 for p in (line.split() for line in chunk.split("\n")[:-1])
                if len(p) == 4 and p[0] == "P" and p[1] == serial]

    def longest_gap_ms(self, serial: str, start: int, settle: int = 3) -> float:
        """The longest gap the probe saw from ``start`` until ``settle`` more reports came
        after the moment of this call (the period holding the stall is then complete)."""
        now = self.offset()
        wait_for(f"{settle} probe reports on {serial}",
                 lambda: len(self.gaps_ms(serial, now)) >= settle, 60)
        return max(self.gaps_ms(serial, start))

    # ---- the agent --------------------------------------------------------------------------

    def _domain(self) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        conn = libvirt.open(self.uri)
        return conn, conn.lookupByName(self.name)

    def agent(self, command: str, arguments: dict[str, object] | None = None,
              timeout: int = 10) -> object:
        conn, dom = self._domain()
        try:
            message = {"execute": command, **({"arguments": arguments} if arguments else {})}
            return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), timeout,
                                                            0))["return"]
        finally:
            conn.close()

    def run(self, *argv: str, timeout: float = 60) -> tuple[int, str]:
        """A command run inside the guest by its agent: (exit code, its output)."""
        started = self.agent("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                            "capture-output": True})
        pid = started["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            assert isinstance(status, dict)
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                return int(status.get("exitcode", -1)), out
            if time.monotonic() > deadline:
                raise GuestFailed(f"{' '.join(argv)} still runs in the guest after {timeout} s")
            time.sleep(0.05)

    def check(self, serial: str) -> int:
        """The records the guest itself reads back from the disk (past its page cache)."""
        code, out = self.run("/bin/guestctl", "check", serial)
        assert code == 0, f"the guest found a bad record on {serial}: {out}"
        return int(out.split()[1])

    def stop_writer(self, serial: str) -> int:
        """Stops the writer and probe on ``serial`` and unmounts it; the last record acked."""
        code, out = self.run("/bin/guestctl", "stop", serial)
        assert code == 0, out
        return self.acked(serial)

    def hang_agent(self, seconds: int) -> None:
        """SIGSTOPs the guest's agent for ``seconds`` (it is continued from inside)."""
        self.agent("guest-exec", {"path": "/bin/guestctl", "arg": ["hang-agent", str(seconds)]})

    def answers(self) -> bool:
        try:
            self.agent("guest-ping", timeout=5)
        except libvirt.libvirtError:
            return False
        return True

    def frozen(self) -> bool:
        return self.agent("guest-fsfreeze-status", timeout=30) == "frozen"

    def is_running(self) -> bool:
        conn = libvirt.open(self.uri)
        try:
            return bool(conn.lookupByName(self.name).isActive())
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()


def boot(image: GuestImage, name: str, console: Path, uri: str = "qemu:///system",
         params: str = "", seconds: float = 120) -> RealGuest:
    """Starts the guest (transient) and waits until its agent runs."""
    conn = libvirt.open(uri)
    try:
        conn.createXML(GUEST_XML.format(name=name, kernel=image.kernel, initrd=image.initrd,
                                        console=console, params=params), 0)
    finally:
        conn.close()
    guest = RealGuest(name, console, uri)
    start = guest.offset()
    try:
        wait_for(f"guest {name} to boot", lambda: "G ready" in guest.lines(start), seconds)
        # libvirt sees the agent's port open a moment after the agent started
        wait_for(f"the agent of {name} to answer", guest.answers, 30)
    except GuestFailed as exc:
        raise GuestFailed(f"{exc}\n{guest.tail()}") from None
    return guest

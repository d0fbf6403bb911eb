"""The fence guard: kills this host's qemu-img children once its lease could have expired,
and the daemon itself once it stopped running.

Run by the daemon (``python -m hostvold.storage.fenceguard HOST_ID``) as the leader of a
process group every writing child joins. Its input carries deadlines, one per line
(``lease T`` and ``alive T``, ``time.monotonic()`` seconds, the same clock in every process
of the machine). It waits, blocked in ``select``, until the input speaks or a deadline
passes:
- the lease's deadline passed with no newer one: the daemon did not renew its lease in time
  (stopped, stalled, cut off), so every other process of the group gets SIGKILL;
- the alive deadline passed: the daemon's event loop stopped (SIGSTOP, a stall), so the
  daemon gets SIGKILL too, and can never finish a step it began once its lease is gone;
- end of input: the daemon is gone, and so must its children be.
It ignores SIGTERM, SIGINT and SIGHUP: a service stop ends it through its input, after the
daemon, never before.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path


def members(group: int, me: int, daemon: int) -> list[tuple[int, bool, str]]:
    """The processes of ``group`` but this one, and any qemu-img the daemon started outside
    it (every writer should have joined the group; one that did not is fenced all the
    same): each with whether it has already ended (a zombie its stopped daemon has not
    reaped) and how it was found."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, parent, pgrp = fields[0], int(fields[1]), int(fields[2])
        if pgrp == group:
            found.append((int(entry.name), state == "Z", ""))
        elif parent == daemon and _runs_qemu_img(entry):
            found.append((int(entry.name), state == "Z", " (outside the guard's group)"))
    return found


def _runs_qemu_img(entry: Path) -> bool:
    try:
        argv = (entry / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) == b"qemu-img" for arg in argv)


def kill_group(host: str, why: str, daemon: int) -> None:
    """SIGKILL every other process of the group (and the daemon's qemu-img children). Each,
    killed now or already ended (a zombie writes nothing more), is logged as a step that
    ends here."""
    me = os.getpid()
    for pid, ended, where in members(os.getpgid(0), me, daemon):
        if not ended:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        done = "had already ended" if ended else "killed"
        print(f"hostvold fence guard: {why}: pid {pid}{where} {done}\n"
              f"STEP killed t={time.time():.6f} host={host} pid={pid}", file=sys.stderr,
              flush=True)


def kill_daemon(host: str, daemon: int) -> None:
    if daemon > 1:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
        print(f"hostvold fence guard: the daemon of host {host} (pid {daemon}) stopped running "
              "for three quarters of its lease (stopped or stalled): killed, so that it never "
              "finishes a step after its lease; it recovers from its records when started "
              "again", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    host = argv[1] if len(argv) > 1 else "-"
    daemon = os.getppid()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    deadlines: dict[bytes, float] = {}
    pending = b""
    while True:
        soonest = min(deadlines.values(), default=None)
        timeout = None if soonest is None else max(soonest - time.monotonic(), 0.0)
        readable, _, _ = select.select([0], [], [], timeout)
        if not readable:
            if deadlines.get(b"alive", float("inf")) <= time.monotonic():
                why = f"the daemon of host {host} stopped running"
                kill_group(host, why, daemon)  # its writers, while still its children
                kill_daemon(host, daemon)
                kill_group(host, why, daemon)  # whatever it started meanwhile
                return 0
            kill_group(host, f"host {host} did not renew its lease in time", daemon)
            deadlines.pop(b"lease", None)  # until the daemon renews (it starts nothing now)
            continue
        data = os.read(0, 4096)
        if not data:
            kill_group(host, f"the daemon of host {host} is gone", daemon)
            return 0
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            kind, _, value = line.strip().partition(b" ")
            if value:
                deadlines[kind] = float(value)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The fence guard: kills this host's qemu-img children once its lease could have expired.

Run by the daemon (``python -m hostvold.storage.fenceguard HOST_ID``) as the leader of a
process group every writing child joins. Its input carries deadlines, one per line
(``time.monotonic()`` seconds, the same clock in every process of the machine). It waits,
blocked in ``select``, until the input speaks or the deadline passes:
- the deadline passed with no newer one: the daemon did not renew its lease in time
  (stopped, stalled, cut off), so every other process of the group gets SIGKILL;
- end of input: the daemon is gone, and so must its children be.
It ignores SIGTERM, SIGINT and SIGHUP: a service stop ends it through its input, after the
daemon, never before.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path


def members(group: int, me: int) -> list[int]:
    """The processes of ``group`` but this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == group:
            found.append(int(entry.name))
    return found


def kill_group(host: str, why: str) -> None:
    me = os.getpid()
    for pid in members(os.getpgid(0), me):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        print(f"hostvold fence guard: {why}: killed pid {pid}\n"
              f"STEP killed t={time.time():.6f} host={host} pid={pid}", file=sys.stderr,
              flush=True)


def main(argv: list[str]) -> int:
    host = argv[1] if len(argv) > 1 else "-"
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    deadline: float | None = None
    pending = b""
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        readable, _, _ = select.select([0], [], [], timeout)
        if not readable:
            kill_group(host, f"host {host} did not renew its lease in time")
            deadline = None  # until the daemon renews again (it starts nothing meanwhile)
            continue
        data = os.read(0, 4096)
        if not data:
            kill_group(host, f"the daemon of host {host} is gone")
            return 0
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.strip():
                deadline = float(line)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

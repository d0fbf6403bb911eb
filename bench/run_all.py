#!/opt/hostvold/venv/bin/python
"""Every benchmark, one table: measure, figure, target, met or not (SPEC section 15).

    python -m bench.run_all [--quick] [--only P5,P8] [--logs DIR]    (or: make bench)

Each benchmark runs as a process of its own, with this checkout first on PYTHONPATH and the
sizes below (``--quick``: tiny sizes, a smoke run whose figures mean little). Every
benchmark ends its output with one summary line per target it measures:

    P<n>: <what was compared> = <figure> (target <op> <bound>): met|missed

where the figure is a ratio (``1.23x``; the P11 script writes ``12.3x faster``) or, for the
two absolute targets, ``<n> ms`` (P9) or ``<n> KiB`` (P6). Those lines become the rows of
the table. A benchmark that cannot run here (not root, a program missing, no domain can
start: exit status 77) is a row ``skipped: <reason>``, one that fails a row ``failed: ...``;
neither stops the others. Each benchmark's whole output is kept in the log directory named
at the end. Exit status 1 when a benchmark failed, else 0 (a missed target is a figure, not
an error).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CANNOT_RUN = 77  # a benchmark's exit status for "this host lacks what I need"
LINE = re.compile(r"^(?P<id>P\d+): (?P<what>.+) = (?P<figure>.+?) "
                  r"\(target (?P<target>[^()]+)\): (?P<verdict>met|missed)\s*$")

# SPEC section 15, for the rows of targets that were not measured
SPEC: dict[str, tuple[str, str]] = {
    "P1": ("online snapshot create vs bare libvirt", "<= 1.15x"),
    "P2": ("block job start to Job Completed vs to libvirt's event", "<= 1.2x"),
    "P3": ("online delete of 1 GiB of changes vs virsh blockcommit + fsync of the base",
           "<= 1.1x"),
    "P4": ("thick 4 GiB volume vs dd if=/dev/zero", ">= 100x"),
    "P5": ("offline middle snapshot delete, depth 256 vs 8", "<= 1.3x"),
    "P6": ("start, GetManagedObjects at 10,000 vs 1,000 volumes; RSS per volume",
           "<= 10x; <= 10 KiB"),
    "P7": ("32 snapshot creates, parallel vs one after another", "<= 0.6x"),
    "P8": ("snapshot create, depth 256 vs 1", "<= 1.3x"),
    "P9": ("dead share: calls refused; Status() vs healthy", "< 1000 ms; <= 2x"),
    "P10": ("time added by etcd locks vs a bare tooz round trip", "<= 1.2x"),
    "P11": ("reflink clone of 2 GiB vs a full copy", ">= 50x"),
    "P12": ("the real guest's longest I/O stall, hostvold vs libvirt's own", "<= 1.2x"),
    "P13": ("group snapshot of a domain's 8 disks vs one disk's snapshot", "<= 1.3x"),
    "P14": ("changed-block export: bytes read / changed; time vs qemu-io on the extents",
            "<= 1.05x; <= 1.3x"),
    "P15": ("hostvolctl status, volumes, show vs virsh list; completion of 1,000 ids",
            "<= 3x; <= 100 ms"),
}


@dataclass(frozen=True)
class Bench:
    ids: tuple[str, ...]
    module: str  # bench/<module>.py, run as python -m bench.<module>
    full: tuple[str, ...]
    quick: tuple[str, ...]
    needs: tuple[str, ...] = ()  # programs it runs
    root: bool = False


BENCHES = [
    Bench(("P1", "P2"), "live_rig", ("--rounds", "21"), ("--rounds", "1"), root=True),
    Bench(("P3",), "live_delete", ("--changes-mib", "1024", "--rounds", "4"),
          ("--changes-mib", "32"),
          root=True),
    Bench(("P4",), "thick_create", ("--size", "4G", "--rounds", "2"),
          ("--size", "256M", "--rounds", "1"), needs=("dd",)),
    Bench(("P5", "P8"), "snapshot_chain", ("--depths", "1,8,256", "--rounds", "9"),
          ("--depths", "1,8,16", "--rounds", "1"), needs=("qemu-img",)),
    Bench(("P7",), "parallel_snapshots", ("--volumes", "32", "--rounds", "5"),
          ("--volumes", "4", "--rounds", "1"),
          needs=("qemu-img",)),
    Bench(("P9",), "dead_share", ("--rounds", "50"), ("--rounds", "5"),
          needs=("sshfs", "sshd", "ip", "mkfs.ext4", "dbus-daemon", "mount"), root=True),
    Bench(("P10",), "cluster_locks", ("--rounds", "30"), ("--rounds", "5"),
          needs=("etcd", "qemu-img")),
    Bench(("P11",), "clone_offload", ("--rounds", "3"),
          ("--data-mib", "64", "--size-mib", "128", "--rounds", "1"),
          needs=("mkfs.xfs", "qemu-img", "cp"), root=True),
    Bench(("P12",), "guest_pause", ("--rounds", "5"), ("--rounds", "1"),
          needs=("gcc", "apt-get", "dpkg-deb", "virsh"), root=True),
    Bench(("P13",), "group_snapshot", ("--rounds", "9"), ("--rounds", "1"), root=True),
    Bench(("P14",), "changes_export", ("--rounds", "5"),
          ("--size-gib", "1", "--base-mib", "32", "--changed-mib", "32", "--rounds", "1"),
          needs=("qemu-img", "qemu-io", "qemu-nbd", "mkfs.ext4", "findmnt", "setpriv"),
          root=True),
    Bench(("P15",), "cli_latency", ("--volumes", "1000", "--rounds", "21"),
          ("--volumes", "100", "--rounds", "3"), needs=("virsh", "busctl", "dbus-daemon"),
          root=True),
    # last: removing its tens of thousands of files leaves a filesystem mounted with
    # ``discard`` trimming their blocks at every journal commit for a while, which slows the
    # fsyncs measured by any benchmark after it (P7's own floor: fsyncs from 32 threads
    # overlapped 0.5x before it, not at all right after it)
    Bench(("P6",), "scale", ("--volumes", "10000", "--base", "1000"),
          ("--volumes", "200", "--base", "20"),
          needs=("qemu-img", "dbus-daemon", "mount"), root=True),
]
NO_BENCHMARK: dict[str, str] = {}  # targets without a benchmark, and why


@dataclass
class Row:
    id: str
    what: str
    figure: str
    target: str
    result: str  # met, MISSED, skipped: ..., failed: ...


def environment() -> dict[str, str]:
    """This checkout first, whatever the venv's editable install points at."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


def cannot_run(bench: Bench) -> str:
    """Why this host cannot run the benchmark, or ""."""
    if not (REPO / "bench" / f"{bench.module}.py").exists():
        return f"bench/{bench.module}.py is not there yet"
    if bench.root and os.geteuid() != 0:
        return "needs root"
    missing = [name for name in bench.needs if shutil.which(name) is None]
    return f"missing {', '.join(missing)}" if missing else ""


def run_one(bench: Bench, argv: list[str], log: Path, timeout: float) -> tuple[str, str]:
    """(stdout, "" or why there are no figures: "skipped: ..." / "failed: ...")."""
    command = [sys.executable, "-m", f"bench.{bench.module}", *argv]
    started = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        # a session of its own: on a timeout the benchmark and its children go together
        proc = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            out.write(f"{stdout}\n{stderr}\n(killed after {timeout:.0f} s)\n")
            return stdout, f"failed: timed out after {timeout:.0f} s"
        elapsed = time.monotonic() - started
        out.write(f"{stdout}\n--- stderr\n{stderr}\n(exit {proc.returncode}, {elapsed:.1f} s)\n")
    last = (stderr.strip().splitlines() or ["no message"])[-1].strip()
    if proc.returncode == CANNOT_RUN:
        return stdout, f"skipped: {last}"
    if proc.returncode != 0:
        return stdout, f"failed (exit {proc.returncode}): {last[:100]}"
    return stdout, ""


def rows_of(bench: Bench, stdout: str, why: str) -> list[Row]:
    rows = []
    for line in stdout.splitlines():
        found = LINE.match(line.strip())
        if found:
            verdict = "met" if found["verdict"] == "met" else "MISSED"
            rows.append(Row(found["id"], found["what"], found["figure"],
                            found["target"], verdict))
    seen = {row.id for row in rows}
    for target in bench.ids:
        if target not in seen:
            what, bound = SPEC[target]
            rows.append(Row(target, what, "-", bound, why or "failed: no summary line"))
    return rows


def id_number(target: str) -> int:
    return int(target[1:])


def table(rows: list[Row]) -> str:
    cells = [(f"{row.id} {row.what}", row.figure, row.target, row.result) for row in rows]
    header = ("measure", "figure", "target", "result")
    widths = [max(len(cell[i]) for cell in [header, *cells]) for i in range(3)]
    return "\n".join(f"{m:<{widths[0]}}  {f:<{widths[1]}}  {t:<{widths[2]}}  {r}"
                     for m, f, t, r in [header, *cells])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated targets, e.g. P5,P8")
    parser.add_argument("--logs", type=Path, default=None,
                        help="where each benchmark's output goes (default: a new temp dir)")
    args = parser.parse_args()
    wanted = {item.strip().upper() for item in args.only.split(",") if item.strip()}
    unknown = wanted - set(SPEC)
    if unknown:
        parser.error(f"unknown target {', '.join(sorted(unknown))} (P1 to P{len(SPEC)})")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="hostvold-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    timeout = 300.0 if args.quick else 900.0
    started = time.monotonic()
    rows: list[Row] = []
    failed = False
    for bench in BENCHES:
        if wanted and not wanted & set(bench.ids):
            continue
        argv = bench.quick if args.quick else bench.full
        why = cannot_run(bench)
        stdout = ""
        if not why:
            command = list(argv)
            print(f"{','.join(bench.ids)}: bench/{bench.module}.py {' '.join(command)} ...",
                  file=sys.stderr, flush=True)
            began = time.monotonic()
            stdout, why = run_one(bench, command, logs / f"{bench.module}.log", timeout)
            print(f"    {time.monotonic() - began:.1f} s{'; ' + why if why else ''}",
                  file=sys.stderr, flush=True)
        else:
            why = f"skipped: {why}"
        failed |= why.startswith("failed")
        rows += [row for row in rows_of(bench, stdout, why)
                 if not wanted or row.id in wanted]
    for target, why in NO_BENCHMARK.items():
        if not wanted or target in wanted:
            what, bound = SPEC[target]
            rows.append(Row(target, what, "-", bound, f"skipped: {why}"))
    rows.sort(key=lambda row: id_number(row.id))  # stable: a benchmark's own order stays
    print(table(rows))
    print(f"({'quick run, figures not meaningful; ' if args.quick else ''}"
          f"{time.monotonic() - started:.0f} s; each benchmark's output: {logs})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

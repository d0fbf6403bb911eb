"""Every benchmark, one table: measure, figure, target, met or not (SPEC section 15).

    python -m bench.run_all [--quick] [--only P5,P8]

Each benchmark runs as a process of its own with the sizes below (``--quick``: tiny sizes,
a smoke run, figures not meaningful); its own output is kept in the log directory printed at
the end, and the figures are read from its last lines. A benchmark that cannot run here
(not root, a missing tool) is a row saying why, never an abort. Needs root for the loop
mounts. P1 and P2 need a running TCG domain with a volume attached: they are measured by
``tests/test_live.py::test_live_snapshot_latency`` (``bench/live_latency.py``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    measure: str
    figure: str
    target: str
    met: bool | None  # None: not measured here


Reader = Callable[[str], list[Row]]


def _ratio(text: str, pattern: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def _row(measure: str, value: float | None, unit: str, target: str, ok: Callable[[float], bool],
         detail: str = "") -> Row:
    if value is None:
        return Row(measure, "no figure in the output", target, None)
    return Row(measure, f"{value:g}{unit}{detail}", target, ok(value))


def read_thick(out: str) -> list[Row]:
    speed = _ratio(out, r"dd / hostvold\s+([\d.]+)x")
    floor = _ratio(out, r"hostvold / floor\s+([\d.]+)x")
    return [_row("P4 thick volume vs dd", speed, "x faster", ">= 100x", lambda v: v >= 100,
                 f" (hostvold / fallocate floor {floor}x)")]


def read_chain(out: str) -> list[Row]:
    return [_row("P5 middle delete, deep vs shallow chain",
                 _ratio(out, r"delete hostvold ([\d.]+)x"), "x", "<= 1.5x", lambda v: v <= 1.5),
            _row("P8 snapshot create, deep vs shallow chain",
                 _ratio(out, r"create hostvold ([\d.]+)x"), "x", "<= 1.5x", lambda v: v <= 1.5)]


def read_parallel(out: str) -> list[Row]:
    return [_row("P7 32 creates, parallel vs serial", _ratio(out, r": ([\d.]+)x \(P7"), "x",
                 "<= 0.6x", lambda v: v <= 0.6)]


def read_scale(out: str) -> list[Row]:
    count = _ratio(out, r"volumes x(\d+);")
    factor = count or 10.0
    rows = []
    for label in ("start, index loaded", "GetManagedObjects"):
        value = _ratio(out, re.escape(label) + r"\s+\d+ ms\s+\d+ ms\s+([\d.]+)x")
        rows.append(_row(f"P6 {label}, x{factor:g} volumes", value, "x",
                         f"<= {factor:g}x (linear)", lambda v: v <= factor))
    rows.append(_row("P6 memory per volume", _ratio(out, r"([\d.]+) KiB per volume"), " KiB",
                     "<= 10 KiB", lambda v: v <= 10))
    return rows


def read_dead_share(out: str) -> list[Row]:
    return [_row("P9 calls refused after the link died",
                 _ratio(out, r"calls refused ([\d.]+) ms"), " ms", "< 1000 ms",
                 lambda v: v < 1000),
            _row("P9 Status() with a dead share vs healthy",
                 _ratio(out, r"Status\(\) ([\d.]+)x healthy"), "x", "<= 2x", lambda v: v <= 2)]


def read_locks(out: str) -> list[Row]:
    return [_row("P10 etcd lock added vs bare tooz round trip",
                 _ratio(out, r"= ([\d.]+)x the bare lock"), "x", "<= 1.2x", lambda v: v <= 1.2)]


def read_clone(out: str) -> list[Row]:
    return [_row("P11 reflink clone vs full copy", _ratio(out, r"= ([\d.]+)x faster"), "x faster",
                 ">= 50x", lambda v: v >= 50)]


# id, script, arguments (full, quick), reader
BENCHES: list[tuple[str, str, list[str], list[str], Reader]] = [
    ("P4", "thick_create", ["--size", "4G"], ["--size", "256M", "--rounds", "1"], read_thick),
    ("P5,P8", "snapshot_chain", ["--depths", "8,256"], ["--depths", "2,8"], read_chain),
    ("P7", "parallel_snapshots", ["--volumes", "32"], ["--volumes", "4"], read_parallel),
    ("P6", "scale", ["--volumes", "1000"], ["--volumes", "200"], read_scale),
    ("P9", "dead_share", ["--rounds", "50"], ["--rounds", "5"], read_dead_share),
    ("P10", "cluster_locks", ["--rounds", "30"], ["--rounds", "5"], read_locks),
    ("P11", "clone_offload", [], ["--data-mib", "64"], read_clone),
]
ELSEWHERE = [Row("P1 live snapshot create vs bare libvirt", "see test_live_snapshot_latency",
                 "<= 1.25x", None),
             Row("P2 job Completed vs libvirt's event", "see test_live_snapshot_latency",
                 "<= 1.2x", None),
             Row("P3 live delete 1 GiB vs virsh blockcommit", "no benchmark yet", "<= 1.1x",
                 None)]


def run_one(script: str, argv: list[str], log: Path) -> tuple[str, str]:
    """(output, why it could not run or "")."""
    if not (REPO / "bench" / f"{script}.py").exists():
        return "", f"bench/{script}.py is not there"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", f"bench.{script}", *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    log.write_text(f"$ python -m bench.{script} {' '.join(argv)}\n{result.stdout}\n"
                   f"{result.stderr}\n(exit {result.returncode}, "
                   f"{time.monotonic() - started:.1f} s)\n")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return result.stdout, f"failed (exit {result.returncode}): {last[:80]}"
    return result.stdout, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. P5,P8")
    args = parser.parse_args()
    wanted = {item.strip() for item in args.only.split(",") if item.strip()}
    logs = Path(tempfile.mkdtemp(prefix="hostvold-bench-"))
    rows: list[Row] = []
    for ids, script, full, quick, reader in BENCHES:
        if wanted and not wanted & set(ids.split(",")):
            continue
        print(f"running {script} ({ids}) ...", file=sys.stderr, flush=True)
        out, why = run_one(script, quick if args.quick else full, logs / f"{script}.log")
        found = reader(out) if not why else []
        rows += found or [Row(f"{ids} ({script})", f"skipped: {why or 'no figures'}", "", None)]
    if not wanted:
        rows += ELSEWHERE
    width = max(len(row.measure) for row in rows)
    print(f"{'measure':<{width}}  {'figure':<44}  {'target':<20}  result")
    for row in rows:
        result = {True: "met", False: "MISSED", None: "-"}[row.met]
        print(f"{row.measure:<{width}}  {row.figure:<44}  {row.target:<20}  {result}")
    print(f"(each benchmark's own output: {logs})")


if __name__ == "__main__":
    main()

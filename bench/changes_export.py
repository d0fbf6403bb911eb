"""P14: changed-block export (SPEC 5b), what it reads from the share and how long it takes,
side by side with the floor (``qemu-io`` reading just the changed extents) and the naive
full copy (``qemu-img convert -C`` of the whole volume).

    python -m bench.changes_export [--size-gib 16] [--base-mib 256] [--changed-mib 256]
                                   [--rounds 3] [--dir D]        (root)

A hostvold in this process (no bus, no libvirt) on a loop-mounted ext4 share made of a
sparse file: one thin raw volume of ``--size-gib`` holding ``--base-mib`` in 1 MiB pieces,
snapshot S1, then ``--changed-mib`` written into the overlay in 1 MiB pieces at random
places (one ``qemu-io``). Each round, the three in turn (the order rotating), each from a
cold cache (sync, then ``drop_caches``; then the programs used are paged in again):

- export: ``ChangeExports.export(S1 -> now)`` (what ``Volume.ExportChanges`` runs) from the
  call until its job has ended, read by a libnbd client (Debian's python3-libnbd, run with
  /usr/bin/python3) that asks the bitmap ``qemu:dirty-bitmap:hostvold-changes`` for the
  changed extents and reads just those, discarding the data;
- floor: one ``qemu-io -r`` on the overlay reading exactly those extents, in the same
  pieces (at most 32 MiB, NBD's largest request);
- naive: ``qemu-img convert -C -f qcow2 -O raw`` of the whole volume into a new file on
  the share (copy offloading: ``copy_file_range``), not synced.

Bytes read from the share are the loop device's own count of sectors read
(``/sys/block/loopN/stat``) over each run: every read by every process (qemu-img map, the
NBD server, the kernel's read-ahead, the filesystem's metadata). The figures are medians.
The last two lines are the P14 summaries (bench/run_all.py). Exit status 77 with one line
on stderr when this host cannot run it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostvold.core.changes import Extent
from hostvold.core.config import parse_config
from hostvold.ops.changes import ChangeExports, Export
from hostvold.ops.operations import Operations
from hostvold.server.daemon import Daemon
from hostvold.storage.changeview import CONTEXT
from hostvold.storage.infofile import read_info

MiB, GiB = 1 << 20, 1 << 30
CANNOT_RUN = 77
BYTES_TARGET, TIME_TARGET = 1.05, 1.3
PIECE = 32 * MiB  # the largest NBD request; the floor reads in the same pieces
PROGRAMS = ("qemu-img", "qemu-io", "qemu-nbd", "mkfs.ext4", "mount", "findmnt", "setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd lives there, not in the venv
WARM = [["qemu-img", "--version"], ["qemu-io", "--version"], ["qemu-nbd", "--version"],
        ["setpriv", "--version"], ["bash", "-c", "true"], ["prlimit", "--version"],
        [SYSTEM_PYTHON, "-c", "import json, nbd"]]

# The client: asks the server which extents are dirty, reads just those, keeps nothing.
READER = """
import json, sys
import nbd
fd, context, piece = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.add_meta_context(context)
h.connect_socket(fd)
size, runs = h.get_size(), []
def seen(name, offset, entries, error):
    if name == context:
        for i in range(0, len(entries), 2):
            runs.append((offset, entries[i], entries[i + 1]))
            offset += entries[i]
    return 0
offset = 0
while offset < size:
    before = len(runs)
    h.block_status(min(size - offset, 1 << 30), offset, seen)
    offset = runs[-1][0] + runs[-1][1] if len(runs) > before else size
read = 0
for start, length, flags in runs:
    if flags & 1:
        for at in range(start, start + length, piece):
            n = min(piece, start + length - at)
            h.pread(n, at)
            read += n
h.shutdown()
print(json.dumps({"read": read, "extents": sum(1 for r in runs if r[2] & 1)}))
"""


class CannotRun(Exception):
    pass


class Steps:
    """Where an export's time goes: each program hostvold starts meanwhile, from its start
    until it was waited for (the NBD server: until its client left)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, float]] = []  # label, start, seconds
        self.origin = time.perf_counter()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        real = asyncio.create_subprocess_exec
        self.seen, self.origin = [], time.perf_counter()

        async def started(*argv: Any, **kwargs: Any) -> asyncio.subprocess.Process:
            at = time.perf_counter()
            proc = await real(*argv, **kwargs)
            waited = proc.wait

            async def wait() -> int:
                code = await waited()
                self.seen.append((label(argv), at - self.origin, time.perf_counter() - at))
                return code

            proc.wait = wait  # type: ignore[method-assign]
            return proc

        asyncio.create_subprocess_exec = started
        try:
            yield
        finally:
            asyncio.create_subprocess_exec = real


def label(argv: tuple[Any, ...]) -> str:
    words = [str(a) for a in argv]
    if "--" in words[:8] and words[0] == "prlimit":
        words = words[words.index("--") + 1:]
    if words[0] == "setpriv":
        return "qemu-nbd serving (until the client left)"
    if words[0] == SYSTEM_PYTHON:
        return "the libnbd client reading"
    if words[0] == "qemu-img":
        return " ".join(["qemu-img", words[1], *(w for w in words[2:] if w in (
            "--add", "--merge", "--disable"))])
    return words[0]


@dataclass
class Run:
    seconds: float
    share_bytes: int
    setup: float = 0.0  # export only: the call until the connection is handed over


def settle() -> None:
    """Nothing dirty, nothing of the share in any page cache; the programs themselves
    paged in again, as on a host that runs them all the time (else the export, which
    starts more programs than qemu-io, would be timed reading their binaries)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for argv in WARM:
        subprocess.run(argv, capture_output=True)


def sectors_read(device: str) -> int:
    return int(Path(f"/sys/block/{device}/stat").read_text().split()[2])


async def measured(device: str, work: Callable[[], Awaitable[float]]) -> Run:
    """``work`` from a cold cache: its own figure of seconds (or setup, see Run), and the
    bytes the share's block device was asked to read meanwhile."""
    settle()
    before = sectors_read(device)
    started = time.perf_counter()
    setup = await work()
    elapsed = time.perf_counter() - started
    return Run(elapsed, (sectors_read(device) - before) * 512, setup)


def pieces(runs: list[Extent]) -> list[tuple[int, int]]:
    return [(at, min(PIECE, r.start + r.length - at)) for r in runs if r.dirty
            for at in range(r.start, r.start + r.length, PIECE)]


async def qemu_io(image: Path, fmt: str, script: str, read_only: bool = False) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", *(["-r"] if read_only else []), "-f", fmt, str(image),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0 or err.strip():
        raise SystemExit(f"qemu-io on {image.name}: {err.decode(errors='replace')[-300:]}")


async def export_once(exports: ChangeExports, volume_id: str, since: str
                      ) -> tuple[float, list[Extent], dict[str, int]]:
    """One export read by the libnbd client: (seconds until the connection was handed
    over, the extent map, what the client read)."""
    started = time.perf_counter()
    ready: asyncio.Future[Export] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(exports.export(volume_id, since, None, False, ready))
    either: list[asyncio.Future[Any]] = [ready, task]
    done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if task in done and not ready.done():
        task.result()
    export = ready.result()
    setup = time.perf_counter() - started
    try:
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", READER, str(export.fd), CONTEXT, str(PIECE),
            pass_fds=(export.fd,), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    finally:
        os.close(export.fd)
    if proc.returncode != 0:
        raise SystemExit(f"the NBD client failed: {err.decode(errors='replace')[-500:]}")
    await asyncio.wait_for(task, 60)
    return setup, export.runs, json.loads(out)


async def prepare(ops: Operations, args: argparse.Namespace, rng: random.Random
                  ) -> tuple[str, str, Path, int]:
    """The volume, S1, and the changes after it: (volume id, S1, active overlay, bytes
    changed)."""
    size = args.size_gib * GiB
    meta = await ops.create_volume(size=size, format="raw")
    files = ops.store.files_of(meta)
    slots = size // MiB
    base = rng.sample(range(slots), args.base_mib)
    await qemu_io(files.base, "raw", "".join(f"write -P 0x11 {s * MiB} 1M\n" for s in base))
    s1 = (await ops.create_snapshot(meta.id)).id
    active = files.directory / read_info(files).active
    changed = sorted(rng.sample(range(slots), args.changed_mib))
    await qemu_io(active, "qcow2", "".join(f"write -P {1 + i % 250} {s * MiB} 1M\n"
                                           for i, s in enumerate(changed)))
    return meta.id, s1, active, args.changed_mib * MiB


async def measure(root: Path, args: argparse.Namespace
                  ) -> tuple[dict[str, list[Run]], list[tuple[str, float, float]]]:
    image = root / "share.img"
    with open(image, "wb") as f:
        f.truncate((args.size_gib + 4) * GiB)  # sparse: the volume is thin
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "8192", "-J", "size=64",
                           "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                           str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        raise CannotRun(f"mkfs.ext4 failed: {made.stderr.strip()[-200:]}")
    shares = root / "shares"
    shares.write_text(f"{image} -t ext4 -o loop\n")
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"
                                 f"[shares]\nshares_config = {shares}\n"), with_libvirt=False)
    try:
        ops = await daemon.start()
    except Exception as exc:  # no loop device here, most likely
        raise CannotRun(f"no share could be mounted: {exc}") from None
    try:
        vid, s1, active, changed = await prepare(ops, args, random.Random(14))
        share = active.parent
        device = Path(subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--target", str(share)],
                                     capture_output=True, text=True, check=True)
                      .stdout.strip()).name
        if not device.startswith("loop") or not Path(f"/sys/block/{device}/stat").exists():
            raise CannotRun(f"the share is not on a loop device ({device})")
        exports = ChangeExports(ops, root / "exports")
        steps = Steps()
        _, runs, _ = await export_once(exports, vid, s1)  # warm-up, and the extents
        marked = sum(r.length for r in runs if r.dirty)
        if marked != changed:
            raise SystemExit(f"the export marks {marked} bytes changed, {changed} were")
        floor_script = "".join(f"read {at} {n}\n" for at, n in pieces(runs))
        naive_target = share / "naive-full-copy.raw"

        async def export() -> float:
            with steps.watching():
                setup, _, seen = await export_once(exports, vid, s1)
            if seen["read"] != changed:
                raise SystemExit(f"the client read {seen['read']} bytes, not {changed}")
            return setup

        async def floor() -> float:
            await qemu_io(active, "qcow2", floor_script, read_only=True)
            return 0.0

        async def naive() -> float:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "convert", "-C", "-f", "qcow2", "-O", "raw", str(active),
                str(naive_target), stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"qemu-img convert -C: {err.decode(errors='replace')}")
            return 0.0

        methods: dict[str, Callable[[], Awaitable[float]]] = {
            "export": export, "floor": floor, "naive": naive}
        results: dict[str, list[Run]] = {name: [] for name in methods}
        names = list(methods)
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[:round_ % 3]:
                results[name].append(await measured(device, methods[name]))
                if name == "naive":
                    naive_target.unlink()
        await ops.delete_volume(vid)
        return results, steps.seen
    finally:
        assert daemon.index is not None
        daemon.index.close()
        unmount_under(root)


def unmount_under(root: Path) -> None:
    """Every mount at or under ``root``, deepest first (the share hostvold mounted)."""
    points = [Path(line.split()[4]) for line in
              Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p == root or root in p.parents),
                        key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def report(args: argparse.Namespace, results: dict[str, list[Run]],
           steps: list[tuple[str, float, float]]) -> None:
    changed = args.changed_mib * MiB
    time_of = {name: statistics.median(r.seconds for r in runs)
               for name, runs in results.items()}
    read_of = {name: statistics.median(r.share_bytes for r in runs)
               for name, runs in results.items()}
    setup = statistics.median(r.setup for r in results["export"])
    print(f"changed-block export: a {args.size_gib} GiB thin raw volume holding "
          f"{args.base_mib} MiB, {args.changed_mib} MiB changed since S1 in 1 MiB pieces; "
          f"cold cache, median of {args.rounds}")
    labels = {"export": "hostvold export S1->now, libnbd reads the dirty extents",
              "floor": "floor: qemu-io reads just those extents",
              "naive": "naive: qemu-img convert -C of the whole volume"}
    print(f"  {'':<56} {'time ms':>9} {'read MiB':>9} {'read/changed':>13}")
    for name, label in labels.items():
        print(f"  {label:<56} {time_of[name] * 1000:9.1f} {read_of[name] / MiB:9.1f} "
              f"{read_of[name] / changed:13.3f}")
    print(f"  {'  of which the call until the connection is handed over':<56} "
          f"{setup * 1000:9.1f}")
    print("the export's programs in its last round (ms from the call: start +duration):")
    for name, at, seconds in sorted(steps, key=lambda step: step[1]):
        print(f"  {at * 1000:8.1f} +{seconds * 1000:7.1f}  {name}")
    print("each round: " + "; ".join(
        f"{name} " + ", ".join(f"{r.seconds * 1000:.0f} ms/{r.share_bytes / MiB:.1f} MiB"
                               for r in runs) for name, runs in results.items()))
    print(f"export / naive full convert: {time_of['export'] / time_of['naive']:.3f}x "
          f"({time_of['naive'] / time_of['export']:.1f}x faster)")
    ratio_bytes = read_of["export"] / changed
    ratio_time = time_of["export"] / time_of["floor"]
    print(f"P14: changed-block export of {args.changed_mib} MiB in {args.size_gib} GiB, bytes "
          f"read from the share / bytes changed = {ratio_bytes:.3f}x (target <= "
          f"{BYTES_TARGET}x): {'met' if ratio_bytes <= BYTES_TARGET else 'missed'}")
    print(f"P14: changed-block export of {args.changed_mib} MiB in {args.size_gib} GiB, time "
          f"vs reading just those extents with qemu-io = {ratio_time:.2f}x (target <= "
          f"{TIME_TARGET}x): {'met' if ratio_time <= TIME_TARGET else 'missed'}")


def cannot_run() -> str:
    if os.geteuid() != 0:
        return "needs root (a loop mount, drop_caches)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode != 0:
        return "missing python3-libnbd (Debian package) for /usr/bin/python3"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=16, help="the volume's size")
    parser.add_argument("--base-mib", type=int, default=256, help="data below S1")
    parser.add_argument("--changed-mib", type=int, default=256, help="changes after S1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the share image goes")
    args = parser.parse_args()
    why = cannot_run()
    if why:
        print(why, file=sys.stderr)
        return CANNOT_RUN
    root = Path(tempfile.mkdtemp(prefix="hostvold-changes-", dir=args.dir))
    try:
        results, steps = asyncio.run(measure(root, args))
    except CannotRun as exc:
        print(exc, file=sys.stderr)
        return CANNOT_RUN
    finally:
        unmount_under(root)  # never remove what is still mounted
        shutil.rmtree(root, ignore_errors=True)
    report(args, results, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Snapshot creates on many volumes, in parallel against one after another (P7).

    python bench/parallel_snapshots.py [--volumes 32] [--rounds 5] [--dir /path]

Operations on different volumes take different locks, so they overlap. Each round takes
both figures, one after the other (``--rounds``, default 5); the ratio is the median of the
rounds' ratios, so a machine that slows down during the run skews no side. Prints both
times and the ratio (target: parallel <= 0.6x sequential), the floor measured in the same run (the
durable writes alone that each create must make, four atomic writes in the volume's
directory, one after another against from 32 threads at once: how much the filesystem
itself lets fsyncs overlap), and as its last line the P7 summary (bench/run_all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostvold.core.config import parse_config
from hostvold.server.daemon import Daemon
from hostvold.storage.atomic import write_atomic


async def measure(root: Path, count: int,
                  rounds: int) -> tuple[list[tuple[float, float]], float, float]:
    """Per round (sequential, parallel) seconds, then the floor's two figures."""
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"),
                    with_libvirt=False)
    volumes = await daemon.start()
    snapshots = daemon.ops
    assert snapshots is not None
    ids = [(await volumes.create_volume(size=64 << 20)).id for _ in range(count)]
    figures, cpu_seconds = [], 0.0
    for _ in range(rounds):
        os.sync()  # the same start every round: no writeback of earlier work (or of an
        # earlier benchmark) competing with the fsyncs measured
        start = time.perf_counter()
        for volume_id in ids:
            await snapshots.create_snapshot(volume_id)
        sequential = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(snapshots.create_snapshot(volume_id) for volume_id in ids))
        figures.append((sequential, time.perf_counter() - start))
        cpu_seconds += time.process_time() - cpu
    print(f"CPU time of the parallel creates (every thread of this process): "
          f"{cpu_seconds / rounds * 1000:.0f} ms per round; in-process work on one event "
          "loop overlaps I/O, not Python")
    directories = [volumes.store.files_of(volumes.store.get_volume(i)).directory for i in ids]
    await daemon.stop()
    return figures, *durable_floor(directories)


def durable_floor(directories: list[Path]) -> tuple[float, float]:
    """Seconds for four atomic writes in each directory: one after another, then with one
    thread per directory."""
    def writes(directory: Path) -> None:
        for name in ("intent", "overlay", "info", "done"):
            write_atomic(directory / f"floor-{name}", b"x" * 512, 0o600)

    start = time.perf_counter()
    for directory in directories:
        writes(directory)
    sequential = time.perf_counter() - start
    with ThreadPoolExecutor(max_workers=len(directories)) as pool:
        start = time.perf_counter()
        list(pool.map(writes, directories))
        parallel = time.perf_counter() - start
    return sequential, parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        figures, floor_seq, floor_par = asyncio.run(measure(Path(tmp), args.volumes,
                                                            args.rounds))
    for number, (sequential, parallel) in enumerate(figures, 1):
        print(f"round {number}: {args.volumes} snapshot creates one after another "
              f"{sequential * 1000:.0f} ms, in parallel {parallel * 1000:.0f} ms: "
              f"{parallel / sequential:.2f}x")
    sequential = statistics.median(seq for seq, _ in figures)
    parallel = statistics.median(par for _, par in figures)
    ratio = round(statistics.median(par / seq for seq, par in figures), 2)
    print(f"{args.volumes} snapshot creates, median of {len(figures)} rounds: one after "
          f"another {sequential * 1000:.0f} ms, in parallel {parallel * 1000:.0f} ms; median "
          f"ratio {ratio:.2f}x (P7 target <= 0.6x)")
    print(f"floor: their durable writes alone (four atomic writes per volume): one after "
          f"another {floor_seq * 1000:.0f} ms, from {args.volumes} threads "
          f"{floor_par * 1000:.0f} ms: {floor_par / floor_seq:.2f}x; hostvold in parallel "
          f"takes {parallel * 1000:.0f} ms = {parallel / floor_par:.2f}x of the parallel "
          "floor")
    print(f"P7: {args.volumes} snapshot creates on {args.volumes} volumes, in parallel vs one "
          f"after another = {ratio:.2f}x (target <= 0.6x): {'met' if ratio <= 0.6 else 'missed'}")


if __name__ == "__main__":
    main()

"""Snapshot creates on many volumes, in parallel against one after another (P7).

    python bench/parallel_snapshots.py [--volumes 32] [--dir /path]

Operations on different volumes take different locks, so they overlap; the floor is one
volume's create. Prints both times and the ratio (target: parallel <= 0.6x sequential), and
as its last line the P7 summary (bench/run_all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from hostvold.core.config import parse_config
from hostvold.server.daemon import Daemon


async def measure(root: Path, count: int) -> tuple[float, float]:
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"),
                    with_libvirt=False)
    volumes = await daemon.start()
    snapshots = daemon.ops
    assert snapshots is not None
    ids = [(await volumes.create_volume(size=64 << 20)).id for _ in range(count)]
    start = time.perf_counter()
    for volume_id in ids:
        await snapshots.create_snapshot(volume_id)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(snapshots.create_snapshot(volume_id) for volume_id in ids))
    parallel = time.perf_counter() - start
    await daemon.stop()
    return sequential, parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sequential, parallel = asyncio.run(measure(Path(tmp), args.volumes))
    print(f"{args.volumes} snapshot creates: one after another {sequential * 1000:.0f} ms, "
          f"in parallel {parallel * 1000:.0f} ms: {parallel / sequential:.2f}x "
          f"(P7 target <= 0.6x)")
    ratio = round(parallel / sequential, 2)
    print(f"P7: {args.volumes} snapshot creates on {args.volumes} volumes, in parallel vs one "
          f"after another = {ratio:.2f}x (target <= 0.6x): {'met' if ratio <= 0.6 else 'missed'}")


if __name__ == "__main__":
    main()

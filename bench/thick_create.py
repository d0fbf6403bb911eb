"""Thick volume creation: hostvold end to end vs ``dd if=/dev/zero`` (what Cinder does)
vs the bare ``fallocate`` syscall (the physical floor), side by side in one run.

    python bench/thick_create.py [--size 4G] [--dir /path/on/the/filesystem/to/test]

Prints each time and the ratios, and as its last line the P4 summary (bench/run_all.py).
Not a timed test: figures depend on the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from hostvold.core.config import parse_config
from hostvold.core.units import format_size, parse_size
from hostvold.server.daemon import Daemon
from hostvold.storage.files import fallocate


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.sync()


def time_dd(path: Path, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={size >> 22}",
                    "conv=fsync", "status=none"], check=True)
    return time.perf_counter() - start


def time_fallocate(path: Path, size: int) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


async def time_hostvold(state_dir: Path, size: int) -> float:
    config = parse_config(f"[daemon]\nstate_dir = {state_dir}\n")
    daemon = Daemon(config, with_libvirt=False)
    service = await daemon.start()
    start = time.perf_counter()
    meta = await service.create_volume(size=size, provisioning="thick")
    elapsed = time.perf_counter() - start
    path = config.local_share_dir / meta.active
    assert path.stat().st_blocks * 512 >= size, "volume is not fully allocated"
    await service.delete_volume(meta.id)
    assert daemon.index is not None
    daemon.index.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="4G")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        results: dict[str, list[float]] = {"fallocate (floor)": [], "hostvold": [], "dd": []}
        for _ in range(args.rounds):  # interleaved, so drift hits all three alike
            results["fallocate (floor)"].append(time_fallocate(root / "floor", size))
            drop_file(root / "floor")
            results["hostvold"].append(asyncio.run(time_hostvold(root / "state", size)))
            os.sync()
            results["dd"].append(time_dd(root / "dd", size))
            drop_file(root / "dd")
    best = {name: min(times) for name, times in results.items()}
    print(f"thick volume of {format_size(size)} on {args.dir or tempfile.gettempdir()}, "
          f"best of {args.rounds}")
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds * 1000:10.1f} ms")
    print(f"  hostvold / floor   {best['hostvold'] / best['fallocate (floor)']:10.1f}x")
    speedup = best["dd"] / best["hostvold"]
    print(f"  dd / hostvold      {speedup:10.1f}x faster (P4 target: >= 100x)")
    speedup = round(speedup, 1)
    print(f"P4: thick {format_size(size)} volume, dd if=/dev/zero / hostvold = {speedup:.1f}x "
          f"(target >= 100x): {'met' if speedup >= 100 else 'missed'}")


if __name__ == "__main__":
    main()

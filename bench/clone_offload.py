"""Clone of a raw volume on a share that can share extents (XFS with reflink), side by side:
hostvold's clone (``qemu-img convert -C``: copy_file_range) vs a full copy (``qemu-img
convert`` without offloading, what Cinder's NFS driver runs) vs the physical floor (``cp
--reflink=always``: one FICLONE ioctl, no qemu-img at all).

    python -m bench.clone_offload [--data-mib 2048] [--size-mib 4096] [--rounds 3] [--dir D]

Each round clones the same volume; the space each method used is read from the share's
counters. The last line is the P11 summary (bench/run_all.py). Needs root (a loop mount)
and mkfs.xfs; exit status 77 when this host lacks them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hostvold.core.config import parse_config
from hostvold.server.daemon import Daemon

MiB = 1 << 20
CANNOT_RUN = 77


def settle() -> None:
    """Each method starts alike: nothing dirty, nothing of the source in the page cache (a
    clone on a real share reads from the server, not from this host's memory)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def timed_command(argv: list[str], share: Path, target: Path) -> tuple[float, int]:
    settle()
    before = used(share)
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    os.sync()  # a copy is done when it is on disk
    elapsed = time.perf_counter() - start
    grown = used(share) - before
    target.unlink()
    return elapsed, grown


async def measure(root: Path, args: argparse.Namespace) -> dict[str, list[tuple[float, int]]]:
    image = root / "share.img"
    with open(image, "wb") as f:
        f.truncate((2 * args.data_mib + args.size_mib + 512) * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    shares = root / "shares"
    shares.write_text(f"{image} -t xfs -o loop\n")
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"
                                 f"[shares]\nshares_config = {shares}\n"), with_libvirt=False)
    ops = await daemon.start()
    try:
        source = await ops.create_volume(size=args.size_mib * MiB, format="raw")
        path = ops.store.files_of(source).base
        share = path.parent
        writes = [f"write -P 0x5a {offset}M {min(256, args.data_mib - offset)}M"
                  for offset in range(0, args.data_mib, 256)]  # one request stays < 2 GiB
        subprocess.run(["qemu-io", "-f", "raw", *(w for c in writes for w in ("-c", c)),
                        str(path)], check=True, capture_output=True)
        os.sync()
        times: dict[str, list[tuple[float, int]]] = {}
        for _ in range(args.rounds):
            settle()
            before = used(share)
            start = time.perf_counter()
            clone = await ops.clone(source.id, format="raw")
            os.sync()
            elapsed = time.perf_counter() - start
            times.setdefault("hostvold clone", []).append((elapsed, used(share) - before))
            await ops.delete_volume(clone.id)

            copy = share / "naive-copy.raw"
            times.setdefault("full copy", []).append(timed_command(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none",
                 str(path), str(copy)], share, copy))
            times.setdefault("floor", []).append(timed_command(
                ["cp", "--reflink=always", str(path), str(copy)], share, copy))
        await ops.delete_volume(source.id)
        return times
    finally:
        assert daemon.index is not None
        daemon.index.close()
        for mounted in sorted((root / "state" / "mnt").glob("*"), reverse=True):
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True)
        subprocess.run(["umount", "-R", "-l", str(root / "state" / "mnt")], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=2048, help="data the volume holds")
    parser.add_argument("--size-mib", type=int, default=4096, help="the volume's size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the share image goes")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print("needs root and mkfs.xfs (xfsprogs)", file=sys.stderr)
        return CANNOT_RUN
    root = Path(tempfile.mkdtemp(prefix="hostvold-clone-", dir=args.dir))
    try:
        times = asyncio.run(measure(root, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {name: statistics.median(t for t, _ in rows) for name, rows in times.items()}
    space = {name: max(s for _, s in rows) for name, rows in times.items()}
    print(f"clone of a {args.size_mib} MiB raw volume holding {args.data_mib} MiB, XFS with "
          f"reflink, median of {args.rounds}:")
    for name in ("hostvold clone", "full copy", "floor"):
        print(f"  {name:<15} {median[name] * 1000:9.1f} ms   space used "
              f"{space[name] / MiB:8.1f} MiB")
    speedup = median["full copy"] / median["hostvold clone"]
    floor = median["hostvold clone"] / median["floor"]
    print(f"hostvold / floor (cp --reflink): {floor:.1f}x (the rest is qemu-img's start, the "
          "intent record, the metadata and info files and their fsyncs)")
    print(f"P11: clone holding {args.data_mib} MiB, full copy / hostvold = {speedup:.1f}x "
          f"faster (target >= 50x): {'met' if speedup >= 50 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

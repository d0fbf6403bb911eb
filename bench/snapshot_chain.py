"""Snapshot cost against chain depth, hostvold vs the naive (Cinder) way, side by side.

    python bench/snapshot_chain.py [--depths 8,64,256] [--rounds 1] [--dir /path]

For each depth a volume gets that many snapshots, then:
- create: one more snapshot through hostvold (the overlay written in-process; the layers
  below the top are not opened while the info file is the one last walked) vs
  ``qemu-img create`` without ``-u`` (opens the whole chain);
- delete: a middle snapshot through hostvold (the validated header walk, one commit, one
  ``rebase -u``) vs Cinder's walk (one ``qemu-img info`` per layer from the
  active file down to the snapshot, then the same commit and rebase), on identical chains.
With ``--rounds N`` each is done N times per depth and the median kept (the creates lengthen
the chain and the deletes shorten it by one each time: depths are nominal, +- N). The chains
are built first and each round goes through every depth, in an order that turns from round
to round, so that the load of a shared machine weighs on every depth alike.
Prints seconds and the ratios depth N / smallest depth (targets P5 <= 1.3x, P8 <= 1.3x), and
as its last two lines the P5 and P8 summaries (bench/run_all.py): P8 is the deepest chain
against the shallowest, P5 the deepest against depth 8 when 8 was measured (SPEC section 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hostvold.core.config import parse_config
from hostvold.ops.operations import Operations
from hostvold.server.daemon import Daemon
from hostvold.storage.infofile import read_info

MiB = 1 << 20
TARGET = 1.3  # SPEC section 15, P5 and P8 alike: deepest chain at most this times


async def build(volumes: Operations, snapshots: Operations,
                depth: int) -> tuple[str, list[str]]:
    meta = await volumes.create_volume(size=64 * MiB)
    ids = [(await snapshots.create_snapshot(meta.id)).id for _ in range(depth)]
    return meta.id, ids


def naive_delete(directory: Path, active: str, top: str) -> None:
    """Cinder's offline delete of a non-newest snapshot: info on each layer to find the
    layer above ``top``, then commit and rebase."""
    layer, higher = active, None
    while layer != top:
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(directory / layer)],
            capture_output=True, text=True, check=True).stdout)
        higher, layer = layer, info["backing-filename"]
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(directory / top)],
        capture_output=True, text=True, check=True).stdout)
    base = info["backing-filename"]
    subprocess.run(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(directory / top)],
                   check=True)
    (directory / top).unlink()
    assert higher is not None
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", base, "-F",
                    info.get("backing-filename-format", "qcow2"), str(directory / higher)],
                   check=True)


async def measure(root: Path, depths: list[int],
                  rounds: int = 1) -> dict[int, dict[str, float]]:
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"),
                    with_libvirt=False)
    volumes = await daemon.start()
    assert daemon.ops is not None
    snapshots = daemon.ops
    times: dict[int, dict[str, list[float]]] = {depth: {} for depth in depths}
    chains = {depth: await build(volumes, snapshots, depth) for depth in depths}
    files = {depth: volumes.store.files_of(volumes.store.get_volume(volume_id))
             for depth, (volume_id, _) in chains.items()}

    def turns(round_number: int) -> list[int]:
        """Every depth once per round, the order turning each round: the machine's load
        drifts (other work shares it) and hits every depth alike."""
        shift = round_number % len(depths)
        return depths[shift:] + depths[:shift]

    for round_number in range(rounds):
        for depth in turns(round_number):
            volume_id, ids = chains[depth]
            seen, where = times[depth], files[depth]
            os.sync()  # the same start for every create: the writeback of the last is done
            start = time.perf_counter()
            ids.append((await snapshots.create_snapshot(volume_id)).id)
            seen.setdefault("create hostvold", []).append(time.perf_counter() - start)
            seen.setdefault("walk floor", []).append(revalidate(where.directory,
                                                                where.base_name))
            active = read_info(where).active
            start = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", active, "-F",
                            "qcow2", str(where.directory / "naive-overlay"), str(64 * MiB)],
                           check=True)
            seen.setdefault("create naive", []).append(time.perf_counter() - start)
            (where.directory / "naive-overlay").unlink()

    copies = {}
    for depth in depths:  # an identical copy of each chain for the naive delete
        copies[depth] = root / f"naive-{depth}"
        prefix = files[depth].base_name
        shutil.copytree(files[depth].directory, copies[depth],
                        ignore=lambda d, names, prefix=prefix: [
                            n for n in names if not n.startswith(prefix)])
    for round_number in range(rounds):  # the same middle snapshots, in the same order, on both
        for depth in turns(round_number):
            volume_id, ids = chains[depth]
            seen = times[depth]
            middle = ids.pop((len(ids) - 1) // 2)  # never the newest: that is the active file
            # the same start for each side: the copies' writeback (whole chains) or the other
            # side's commit would otherwise land in the next delete's fsyncs
            os.sync()
            start = time.perf_counter()
            await snapshots.delete_snapshot(volume_id, middle)
            seen.setdefault("delete hostvold", []).append(time.perf_counter() - start)
            os.sync()
            start = time.perf_counter()
            naive_delete(copies[depth], active_in(copies[depth]),
                         files[depth].overlay_name(middle))
            seen.setdefault("delete naive", []).append(time.perf_counter() - start)
    for depth in depths:
        shutil.rmtree(copies[depth])
        await volumes.delete_volume(chains[depth][0])
    assert daemon.index is not None
    daemon.index.close()
    return {depth: {name: statistics.median(seen) for name, seen in times[depth].items()}
            for depth in depths}


def revalidate(directory: Path, prefix: str) -> float:
    """Seconds to open, fstat and close every file of the chain once: what any walk that
    may not trust a cached header must do per layer (on NFS an open revalidates the file
    with the server; a bare stat may answer from the client's attribute cache)."""
    names = [str(p) for p in directory.iterdir()
             if p.name.startswith(prefix) and p.suffix not in (".info", ".meta")]
    start = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.fstat(fd)
        os.close(fd)
    return time.perf_counter() - start


def active_in(directory: Path) -> str:
    info = json.loads(next(directory.glob("*.info")).read_text())
    return str(info["active"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", default="8,64,256")
    parser.add_argument("--rounds", type=int, default=1, help="median of this many")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = asyncio.run(measure(Path(tmp), depths, args.rounds))
    columns = ["create hostvold", "create naive", "delete hostvold", "delete naive"]
    print(f"{'depth':>6} " + " ".join(f"{c:>16}" for c in columns) + "   (seconds)")
    for depth, row in results.items():
        print(f"{depth:>6} " + " ".join(f"{row[c]:>16.3f}" for c in columns))
    low = min(results)
    for depth in results:
        if depth == low:
            continue
        r, b = results[depth], results[low]
        print(f"depth {depth} / depth {low}: create hostvold "
              f"{r['create hostvold'] / b['create hostvold']:.2f}x (P8 target <= {TARGET}x), "
              f"delete hostvold {r['delete hostvold'] / b['delete hostvold']:.2f}x "
              f"(P5 target <= {TARGET}x); naive delete "
              f"{r['delete naive'] / b['delete naive']:.2f}x")
    deep = max(results)
    if deep == low:
        return
    shallow = 8 if 8 in results and deep > 8 else low
    summary = [("P5", "middle snapshot delete", "delete hostvold", shallow),
               ("P8", "snapshot create", "create hostvold", low)]
    walk = results[deep]["walk floor"] - results[low]["walk floor"]
    extra = results[deep]["create hostvold"] - results[low]["create hostvold"]
    print(f"P8: a create opens the top layer only (the info file unchanged since the last "
          f"walk); at depth {deep} it takes {extra * 1000:+.2f} ms over depth {low}, where "
          f"re-opening the {deep - low} layers below would cost {walk * 1000:.2f} ms more")
    for target, what, column, base in summary:
        ratio = round(results[deep][column] / results[base][column], 2)
        print(f"{target}: {what}, chain depth {deep} vs {base} = {ratio:.2f}x "
              f"(target <= {TARGET}x): {'met' if ratio <= TARGET else 'missed'}")


if __name__ == "__main__":
    main()

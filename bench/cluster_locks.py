"""Snapshot create with etcd locks against host-local locks, and a bare tooz lock round trip,
side by side in one run (P10).

    python bench/cluster_locks.py [--rounds 30] [--dir /path]

Starts its own etcd (Debian's etcd-server) on a free loopback port. The added time of the
cluster lock (etcd create minus local create) is compared with a bare tooz acquire + release
on the same etcd: the target is at most 1.2x that round trip. The four figures are taken
round by round, interleaved, so a machine that slows down during the run slows them all.
The last line is the P10 summary (bench/run_all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tooz import coordination

from hostvold.core.config import parse_config
from hostvold.server.daemon import Daemon


def start_etcd(root: Path, port: int, peer: int) -> subprocess.Popen[bytes]:
    client, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    proc = subprocess.Popen(
        ["etcd", "--name", "bench", "--data-dir", str(root / "etcd"),
         "--listen-client-urls", client, "--advertise-client-urls", client,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"bench={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):  # the bench waits for its own etcd to answer
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                if b"true" in answer.read():
                    return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("etcd did not start")


async def started(root: Path, backend: str) -> tuple[Daemon, Any, str]:
    """A daemon (no libvirt) with one 64 MiB volume: (daemon, operations, volume id)."""
    root.mkdir()
    config = parse_config(f"[daemon]\nstate_dir = {root / 'state'}\n"
                          f"[coordination]\nbackend_url = {backend}\nhost_id = bench\n")
    daemon = Daemon(config, with_libvirt=False)
    ops = await daemon.start()
    return daemon, ops, (await ops.create_volume(size=64 << 20)).id


def bare_lock(coordinator: Any, name: str, announce: bool = False) -> float:
    """Seconds for a bare tooz acquire + release; with ``announce``, plus the one etcd put
    by which a host tells the others that a volume changed (what hostvold adds per
    operation for the other hosts' fresh views)."""
    lock = coordinator.get_lock(name.encode())
    start = time.perf_counter()
    lock.acquire(True)
    lock.release()
    if announce:
        coordinator.client.put(f"/bench/volumes/{name}", "bench")
    return time.perf_counter() - start


async def interleaved(root: Path, url: str, rounds: int) -> dict[str, list[float]]:
    """Each round: a create with host-local locks, one with etcd locks, a bare lock round
    trip and one with the announcing put, one after another, so that every figure sees
    the same machine (a disk that slows down slows all four)."""
    local, local_ops, local_volume = await started(root / "local", "")
    cluster, cluster_ops, cluster_volume = await started(root / "etcd-host", url)
    coordinator = coordination.get_coordinator(url, b"bench-bare")
    coordinator.start(start_heart=False)
    times: dict[str, list[float]] = {"local": [], "cluster": [], "bare": [], "floor": []}
    try:
        for index in range(rounds):
            for name, ops, volume in (("local", local_ops, local_volume),
                                      ("cluster", cluster_ops, cluster_volume)):
                start = time.perf_counter()
                await ops.create_snapshot(volume)
                times[name].append(time.perf_counter() - start)
            await asyncio.sleep(0.05)  # the create's announcement lands before the bare trips
            times["bare"].append(bare_lock(coordinator, f"bench-{index}"))
            times["floor"].append(bare_lock(coordinator, f"bench-put-{index}", announce=True))
    finally:
        coordinator.stop()
        await cluster.stop()
        await local.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        etcd = start_etcd(root, *ports)
        url = f"etcd3+http://127.0.0.1:{ports[0]}"
        try:
            times = asyncio.run(interleaved(root, url, args.rounds))
        finally:
            etcd.terminate()
            etcd.wait(10)
    local_ms, cluster_ms, bare_ms, floor_ms = (statistics.median(times[name]) * 1000
                                               for name in ("local", "cluster", "bare", "floor"))
    added = cluster_ms - local_ms
    print(f"snapshot create, median of {args.rounds}: host-local locks {local_ms:.1f} ms, "
          f"etcd locks {cluster_ms:.1f} ms; bare tooz acquire + release {bare_ms:.1f} ms")
    print(f"added by the cluster lock {added:.1f} ms = {added / bare_ms:.2f}x the bare lock "
          "round trip (P10 target <= 1.2x)")
    print(f"floor: the same round trip plus the one put that announces the change to the "
          f"other hosts, {floor_ms:.1f} ms: hostvold adds {added / floor_ms:.2f}x of that")
    ratio = round(added / bare_ms, 2)
    print(f"P10: snapshot create, time added by etcd locks vs a bare tooz acquire + release "
          f"= {ratio:.2f}x (target <= 1.2x): {'met' if ratio <= 1.2 else 'missed'}")


if __name__ == "__main__":
    main()

"""CLI latency (P15): hostvolctl status, volumes and show against `virsh list`, and the
completion of volume ids, side by side in one run.

    python -m bench.cli_latency [--volumes 1000] [--rounds 21] [--dir /path]

A private dbus-daemon and a hostvold (its own state directory, filled with ``--volumes``
sparse volumes the way bench/scale.py fills one) answer; every figure is the median wall
time of ``--rounds`` runs of the program as a user starts it (a process of its own), the
runs of the different commands interleaved so a slow moment weighs on all alike:

    virsh -c qemu:///system list        the reference (libvirtd must run: else exit 77)
    busctl call ... Status              the floor: one call, no Python
    hostvolctl status | volumes | show VOL
    hostvolctl __complete volumes       what the bash completion runs at a Tab

The P15 lines: each of status, volumes and show against virsh list (target <= 3x), and the
completion of the volume ids (target <= 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scale import POLICY, populate

REPO = Path(__file__).resolve().parent.parent
CANNOT_RUN = 77
URI = "qemu:///system"
HOSTVOLCTL = shutil.which("hostvolctl", path=str(Path(sys.executable).parent)) or "hostvolctl"


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode()}")
    return seconds


def start_daemon(root: Path, state_dir: Path, address: str) -> subprocess.Popen[bytes]:
    notify = root / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    config = root / "hostvold.conf"
    config.write_text(f"[daemon]\nstate_dir = {state_dir}\nbus = {address}\n"
                      "[libvirt]\nuri = test:///default\n")
    proc = subprocess.Popen([sys.executable, "-m", "hostvold", "--config", str(config)],
                            env=dict(os.environ, NOTIFY_SOCKET=str(notify)),
                            stderr=open(root / "hostvold.log", "a"))  # noqa: SIM115
    listener.settimeout(120)
    while b"READY=1" not in listener.recv(4096):
        if proc.poll() is not None:
            raise SystemExit(f"hostvold exited {proc.returncode}")
    listener.close()
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    for program in ("virsh", "busctl", "dbus-daemon"):
        if shutil.which(program) is None:
            print(f"{program} is missing", file=sys.stderr)
            return CANNOT_RUN
    if subprocess.run(["virsh", "-c", URI, "list"], capture_output=True).returncode != 0:
        print(f"libvirtd does not answer at {URI}", file=sys.stderr)
        return CANNOT_RUN
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "bus.conf").write_text(POLICY.format(socket=root / "bus"))
        bus = subprocess.Popen(["dbus-daemon", "--nofork", "--print-address=1",
                                f"--config-file={root / 'bus.conf'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()
        state_dir = root / "state"
        daemon = None
        try:
            t0 = time.perf_counter()
            asyncio.run(populate(state_dir, args.volumes))
            print(f"populated {args.volumes} volumes in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
            daemon = start_daemon(root, state_dir, address)
            # the console script as installed, running this checkout's client
            env = dict(os.environ, HOSTVOLD_BUS=address, PYTHONPATH=os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
            # as installed: with the byte code written once (the warm-up run writes it)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            ids = subprocess.run([HOSTVOLCTL, "__complete", "volumes"], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            if len(ids) != args.volumes:
                raise SystemExit(f"the completion offered {len(ids)} ids, not {args.volumes}")
            commands = {
                "virsh list": ["virsh", "-c", URI, "list"],
                "busctl call Status": ["busctl", f"--address={address}", "call",
                                       "org.hostvold1", "/org/hostvold1",
                                       "org.hostvold1.Manager", "Status"],
                "hostvolctl status": [HOSTVOLCTL, "status"],
                "hostvolctl volumes": [HOSTVOLCTL, "volumes"],
                "hostvolctl show VOL": [HOSTVOLCTL, "show", ids[len(ids) // 2]],
                "completion of volume ids": [HOSTVOLCTL, "__complete", "volumes"],
            }
            times: dict[str, list[float]] = {name: [] for name in commands}
            for argv in commands.values():  # warm every cache once
                timed(argv, env)
            for _ in range(args.rounds):
                for name, argv in commands.items():
                    times[name].append(timed(argv, env))
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait()
            # the daemon binds its mount base onto itself to make it shared: undo that
            subprocess.run(["umount", "-R", "-l", str(state_dir / "mnt")], capture_output=True)
            bus.terminate()
            bus.wait()
    median = {name: statistics.median(values) for name, values in times.items()}
    reference = median["virsh list"]
    print(f"{args.volumes} volumes; medians of {args.rounds} runs; {HOSTVOLCTL}")
    print(f"{'command':<28}{'median':>10}{'min':>10}{'vs virsh list':>16}")
    for name, value in median.items():
        print(f"{name:<28}{value * 1000:>7.1f} ms{min(times[name]) * 1000:>7.1f} ms"
              f"{value / reference:>15.2f}x")
    for name in ("hostvolctl status", "hostvolctl volumes", "hostvolctl show VOL"):
        ratio = round(median[name] / reference, 2)
        print(f"P15: {name} vs virsh list, {args.volumes} volumes = {ratio:.2f}x "
              f"(target <= 3x): {'met' if ratio <= 3 else 'missed'}")
    ms = round(median["completion of volume ids"] * 1000)
    print(f"P15: completion of volume ids, {args.volumes} volumes = {ms} ms "
          f"(target <= 100 ms): {'met' if ms <= 100 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

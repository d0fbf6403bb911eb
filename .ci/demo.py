"""The whole product working, in a minute: `bash .ci/setup demo` (or this file with
``--bus ADDRESS``) on a machine set up by the README, with hostvold running.

Starts a small TCG domain of its own (64 MiB, no OS: the block layer runs in QEMU), makes
a volume on hostvold's share, attaches it, writes through QEMU's own disk driver, takes
live snapshots, deletes them by each of the three ways (a pull, a commit below the active
file, an active commit with a pivot), checks every write reads back, prints what it did
with timings, and removes everything it made. Exit 0 when all held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import libvirt

DOMAIN = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"""


class Demo:
    def __init__(self, bus: str) -> None:
        self.env = dict(os.environ, HOSTVOLD_BUS=bus)
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f} s] {text}", flush=True)

    def ctl(self, *args: str) -> dict[str, object]:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "hostvold.client", "--json", *args],
                              capture_output=True, text=True, env=self.env, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"hostvolctl {' '.join(args)} failed: {done.stderr.strip()}")
        self.say(f"hostvolctl {' '.join(args)}: {(time.monotonic() - started) * 1000:.0f} ms")
        return dict(json.loads(done.stdout)) if done.stdout.strip() else {}

    def guest(self, name: str, drive: str, command: str) -> str:
        """A command of QEMU's own block layer on the domain's disk (qemu-io)."""
        out = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name,
                              "--hmp", f'qemu-io -d {drive} "{command}"'],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        if "error" in out.lower() or "fail" in out.lower():
            raise SystemExit(f"guest I/O {command!r}: {out.strip()}")
        return out


def drive_of(dom: libvirt.virDomain, serial: str) -> str:
    """The disk's alias (the drive name QEMU's monitor knows), found by its serial."""
    import xml.etree.ElementTree as ET
    for disk in ET.fromstring(dom.XMLDesc(0)).iter("disk"):
        if disk.findtext("serial") == serial:
            alias = disk.find("alias")
            if alias is not None:
                return str(alias.get("name"))
    raise SystemExit(f"the domain has no disk with serial {serial}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bus", default=os.environ.get("HOSTVOLD_BUS", "system"))
    args = parser.parse_args()
    demo = Demo(args.bus)
    conn = libvirt.open("qemu:///system")
    name = f"hostvold-demo-{uuid.uuid4().hex[:6]}"
    dom = conn.createXML(DOMAIN.format(name=name), 0)
    demo.say(f"started TCG domain {name}")
    volume = ""
    try:
        volume = str(demo.ctl("create", "256M")["Id"])
        demo.ctl("attach", volume, name)
        drive = drive_of(dom, volume)
        # (pattern, offset MiB, MiB): a small write, a small one, a large one, a small one
        writes = [(0x11, 0, 1), (0x22, 1, 1), (0x33, 2, 8), (0x44, 12, 1)]

        def write(index: int) -> None:
            pattern, offset, size = writes[index]
            demo.guest(name, drive, f"write -P {pattern} {offset}M {size}M")

        write(0)
        first = str(demo.ctl("snapshot", "create", volume)["Id"])
        write(1)
        second = str(demo.ctl("snapshot", "create", volume)["Id"])
        write(2)
        demo.guest(name, drive, "flush")
        info = demo.ctl("connection-info", volume)
        demo.say(f"the guest runs on {info['name']} ({info['format']}) at {info['path']}")
        # the active file holds 8 MiB, the snapshot's data below it 1 MiB: hostvold pulls
        # the 1 MiB up (blockRebase) rather than commit 8 MiB down
        demo.ctl("snapshot", "delete", second)
        assert demo.ctl("connection-info", volume)["name"] == info["name"]  # top kept
        demo.say("  deleted by a pull: the guest's file stayed, the smaller side moved up")
        third = str(demo.ctl("snapshot", "create", volume)["Id"])
        write(3)
        demo.ctl("snapshot", "delete", first)  # its overlay is below the active file
        demo.say("  deleted by a commit below the active file (blockCommit)")
        before = demo.ctl("connection-info", volume)["name"]
        demo.ctl("snapshot", "delete", third)  # the active file's own, and the smaller side
        assert demo.ctl("connection-info", volume)["name"] != before  # pivoted down
        demo.say("  deleted by an active commit: the guest pivoted to the file below")
        for pattern, offset, size in writes:
            demo.guest(name, drive, f"read -P {pattern} {offset}M {size}M")
        demo.say("every write reads back through the guest's disk")
        shown = demo.ctl("show", volume)
        assert shown["Snapshots"] == [] and shown["State"] == "in-use", shown
        demo.ctl("detach", volume)
    finally:
        if dom.isActive():
            dom.destroy()
        if volume:
            subprocess.run([sys.executable, "-m", "hostvold.client", "delete", volume],
                           env=demo.env, capture_output=True, timeout=300)
        conn.close()
    demo.say("demo done: domain destroyed, volume deleted")


if __name__ == "__main__":
    main()

"""The whole product working, in a minute or two: `bash .ci/setup demo` (or this file with
``--bus ADDRESS``) on a machine set up by the README, with hostvold running.

Boots the real test guest (Debian's kernel, ext4, the guest agent: ``tests/guest``), makes
a volume on hostvold's share and attaches it; the guest puts a filesystem on it and runs a
writer of numbered, fsynced records and a latency probe the whole time. Then it takes live
snapshots (quiesced when hostvold's policy and the agent allow), deletes them by each of the
three ways (a pull, a commit below the active file, an active commit with a pivot), has the
guest read back every record it acknowledged, prints the longest stall the guest's own I/O
saw during each step, and removes everything it made. Exit 0 when all held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's tests/guest
from tests.guest.image import ensure_image
from tests.guest.vm import RealGuest, boot


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

    def step(self, guest: RealGuest, volume: str, what: str, *args: str) -> dict[str, object]:
        """One hostvolctl call, with the longest stall the guest's probe saw meanwhile."""
        mark = guest.offset()
        result = self.ctl(*args)
        self.say(f"  {what}: the guest's longest I/O stall "
                 f"{guest.longest_gap_ms(volume, mark):.0f} ms")
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bus", default=os.environ.get("HOSTVOLD_BUS", "system"))
    args = parser.parse_args()
    demo = Demo(args.bus)
    image = ensure_image()
    scratch = Path(tempfile.mkdtemp(prefix="hostvold-demo-"))
    scratch.chmod(0o755)
    name = f"hostvold-demo-{uuid.uuid4().hex[:6]}"
    guest = boot(image, name, scratch / "console.log")
    demo.say(f"booted the test guest {name} (TCG, Linux, ext4, qemu-ga)")
    volume = ""
    try:
        volume = str(demo.ctl("create", "256M")["Id"])
        demo.ctl("attach", volume, name)
        guest.wait_acked(volume, 5, seconds=120)
        demo.say(f"the guest made ext4 on the volume and writes: record {guest.acked(volume)}"
                 " acknowledged")
        first = demo.step(guest, volume, "snapshot", "snapshot", "create", volume)
        demo.say(f"  quiesced (the guest agent froze the filesystem): {first['Quiesced']}")
        guest.wait_acked(volume, guest.acked(volume) + 5)
        second = demo.step(guest, volume, "snapshot", "snapshot", "create", volume)
        guest.run("/bin/guestctl", "fill", volume, "8")
        demo.say("the guest wrote 8 MiB more")
        info = demo.ctl("connection-info", volume)
        demo.say(f"the guest runs on {info['name']} ({info['format']}) at {info['path']}")
        # the active file holds 8 MiB, the snapshot's data below it little: hostvold pulls
        # that up (blockRebase) rather than commit 8 MiB down
        demo.step(guest, volume, "deleted by a pull", "snapshot", "delete", str(second["Id"]))
        assert demo.ctl("connection-info", volume)["name"] == info["name"]  # top kept
        third = demo.step(guest, volume, "snapshot", "snapshot", "create", volume)
        guest.wait_acked(volume, guest.acked(volume) + 5)
        demo.step(guest, volume, "deleted by a commit below the active file", "snapshot",
                  "delete", str(first["Id"]))
        before = demo.ctl("connection-info", volume)["name"]
        demo.step(guest, volume, "deleted by an active commit and a pivot", "snapshot",
                  "delete", str(third["Id"]))
        assert demo.ctl("connection-info", volume)["name"] != before  # pivoted down
        last = guest.acked(volume)
        read = guest.check(volume)
        assert read >= last + 1, f"the guest read {read} records back, {last + 1} acknowledged"
        demo.say(f"the guest read back all {read} records ({last + 1} were acknowledged "
                 "when it started reading)")
        demo.say(f"the longest stall the guest saw in the whole demo: "
                 f"{max(guest.gaps_ms(volume, 0)):.0f} ms")
        shown = demo.ctl("show", volume)
        assert shown["Snapshots"] == [] and shown["State"] == "in-use", shown
        guest.stop_writer(volume)
        demo.ctl("detach", volume)
    finally:
        conn = libvirt.open("qemu:///system")
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
        conn.close()
        if volume:
            subprocess.run([sys.executable, "-m", "hostvold.client", "delete", volume],
                           env=demo.env, capture_output=True, timeout=300)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    demo.say("demo done: guest destroyed, volume deleted")


if __name__ == "__main__":
    main()

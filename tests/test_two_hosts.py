"""Two daemons as two hosts on one share, without a coordination backend: each with its
own state directory and its own bus, the share's image mounted once at the mount point
both expect. With ``rescan_interval = 1``, what one host changes shows on the other
within the interval (plus slack), through hostvolctl on the other host's bus."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostvold.core.shares import share_hash
from tests.conftest import DaemonProcess, Host, run, umount_all
from tests.test_dbus import Cli, with_bus

pytestmark = pytest.mark.integration
SLACK = 4.0  # seconds beyond the 1 s interval: a CLI round trip, a loaded 2-core machine


@pytest.fixture
def two_hosts(tmp_path: Path, ext4_image: Callable[..., Path],
              bus_factory: Callable[[str], str],
              daemon_factory: Callable[..., DaemonProcess]) -> Iterator[tuple[Cli, Cli]]:
    image = ext4_image("shared", 512)
    base = tmp_path / "mnt"
    point = base / share_hash(str(image))
    point.mkdir(parents=True)
    run("mount", "-o", "loop", "-t", "ext4", str(image), str(point))
    hosts = [Host(tmp_path / name, [image], "[coordination]\nrescan_interval = 1\n",
                  mount_point_base=base) for name in ("a", "b")]
    clis, daemons = [], []
    try:
        for host in hosts:
            address = bus_factory("hostvold")
            daemons.append(daemon_factory(with_bus(host, address)))
            clis.append(Cli(address))
        yield clis[0], clis[1]
    finally:
        for daemon in daemons:
            daemon.stop()
        umount_all(base)


def within(seconds: float, probe: Callable[[], Any]) -> float:
    """How long ``probe`` took to come true (test side only; the daemons never poll)."""
    start = time.monotonic()
    while not probe():
        assert time.monotonic() - start < seconds, f"not seen within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - start


def volume_ids(cli: Cli) -> set[str]:
    return {v["Id"] for v in cli.json("volumes")}


def snapshot_ids(cli: Cli, volume_id: str) -> set[str]:
    return {s["Id"] for s in cli.json("snapshots", volume_id)}


def test_changes_on_one_host_show_on_the_other(two_hosts: tuple[Cli, Cli]) -> None:
    a, b = two_hosts
    waits = {}
    vid = a.json("create", "16M")["Id"]
    waits["create"] = within(1 + SLACK, lambda: vid in volume_ids(b))
    shown = b.json("show", vid)
    assert shown["State"] == "available" and shown["Problems"] == []

    sid = a.json("snapshot", "create", vid)["Id"]
    waits["snapshot create"] = within(1 + SLACK, lambda: snapshot_ids(b, vid) == {sid})
    assert b.json("show", vid)["ActiveFile"] == f"volume-{vid}.{sid}"

    assert a.json("snapshot", "delete", sid)["State"] == "completed"
    waits["snapshot delete"] = within(1 + SLACK, lambda: snapshot_ids(b, vid) == set())
    assert b.json("show", vid)["ActiveFile"] == f"volume-{vid}"

    # the other way round: B works on the volume as the share says it is now
    other = b.json("snapshot", "create", vid)["Id"]
    waits["snapshot create on B"] = within(1 + SLACK, lambda: snapshot_ids(a, vid) == {other})
    assert b.json("snapshot", "delete", other)["State"] == "completed"
    within(1 + SLACK, lambda: snapshot_ids(a, vid) == set())

    assert a.json("delete", vid)["State"] == "completed"
    waits["delete"] = within(1 + SLACK, lambda: vid not in volume_ids(b))
    for cli in (a, b):
        status = cli.json("status")
        assert status["health"] == "ok" and status["volumes"] == 0
    print("seen on the other host after (s):",
          {name: round(wait, 2) for name, wait in waits.items()})

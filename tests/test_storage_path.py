"""The storage path (SPEC section 10), first without a filesystem: a share's host behind a
veth pair into a network namespace of the test's own; the link goes down and up, and the
share's path state follows the kernel's netlink events (no polling, no traffic)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostvold.core.shares import ShareSpec, parse_options
from hostvold.storage.mounts import Share
from hostvold.storage.pathwatch import PathWatch
from tests.conftest import need


def test_the_host_of_a_share() -> None:
    assert parse_options("10.0.0.5:/export", "").host == "10.0.0.5"
    assert parse_options("root@10.0.0.5:/srv/x", "-t fuse.sshfs").host == "10.0.0.5"
    assert parse_options("[fd00::5]:/export", "").host == "fd00::5"
    assert parse_options("nas.example:/a/b", "").host == "nas.example"
    assert parse_options("/dev/vdb", "-t ext4").host is None


class Link:
    """root <-veth-> a namespace holding the share host's address."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{time.monotonic_ns() % 100}"
        self.namespace, self.outer, self.inner = f"hv-path-{tag}", f"hvp{tag}", f"hvq{tag}"
        net = int(tag) % 250
        self.host = f"10.234.{net}.2"
        for command in (
                ["ip", "netns", "add", self.namespace],
                ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner,
                 "netns", self.namespace],
                ["ip", "addr", "add", f"10.234.{net}.1/30", "dev", self.outer],
                ["ip", "link", "set", self.outer, "up"],
                ["ip", "netns", "exec", self.namespace, "ip", "addr", "add", f"{self.host}/30",
                 "dev", self.inner],
                ["ip", "netns", "exec", self.namespace, "ip", "link", "set", self.inner, "up"]):
            subprocess.run(command, check=True, capture_output=True, timeout=10)

    def set(self, state: str, inner: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.namespace] if inner else []
        subprocess.run([*prefix, "ip", "link", "set", self.inner if inner else self.outer,
                        state], check=True, timeout=10)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=10)


@pytest.fixture
def link() -> Iterator[Link]:
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "root and iproute2 (ip)")
    made = Link()
    yield made
    made.close()


async def test_the_path_follows_link_events(link: Link, tmp_path: Path) -> None:
    share = Share(ShareSpec(f"{link.host}:/export"), tmp_path / "mnt")
    local = Share(ShareSpec(str(tmp_path / "img"), "ext4"), tmp_path / "local")
    watch = PathWatch([share, local])
    await watch.start()
    changed = asyncio.Event()
    share.listeners.append(lambda _share: changed.set())
    try:
        assert (share.path, local.path) == ("up", "local"), share.path_detail
        assert link.outer in share.path_detail

        async def after(action: str, inner: bool = False) -> float:
            changed.clear()
            started = time.monotonic()
            link.set(action, inner)
            await asyncio.wait_for(changed.wait(), 5)
            return (time.monotonic() - started) * 1000

        down = await after("down")
        assert share.path == "unreachable" and not share.reachable
        with pytest.raises(Exception, match="unreachable"):
            share.require_reachable()
        up = await after("up")
        assert share.path == "up" and share.reachable
        carrier = await after("down", inner=True)  # the far end: our side loses its carrier
        assert share.path == "unreachable", share.path_detail
        await after("up", inner=True)
        assert share.path == "up"
        print(f"\npath change seen: link down {down:.1f} ms, up {up:.1f} ms, "
              f"carrier lost {carrier:.1f} ms")
    finally:
        watch.stop()

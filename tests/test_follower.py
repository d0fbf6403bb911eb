"""How announcements of other hosts' changes turn into refreshes (pure logic: a fake
store whose reads the test lets finish in any order; tests/test_cluster.py has the real
hosts)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hostvold.core.errors import Busy
from hostvold.ops.cluster import ClusterFollower
from hostvold.storage.clusterlocks import ClusterLocks
from hostvold.storage.coordination import CHANGES, Coordination


class Locks:
    def __init__(self) -> None:
        self.used: set[str] = set()

    def busy(self, volume_id: str) -> bool:
        return volume_id in self.used


class Store:
    """A volume's refresh reads the share (``on_share`` at that moment) and applies what it
    read only when the test lets that read finish."""

    def __init__(self) -> None:
        self.locks = Locks()
        self.listed: set[str] = {"v"}
        self.on_share = True
        self.reads: list[asyncio.Future[None]] = []

    def find(self, volume_id: str) -> object | None:
        return object() if volume_id in self.listed else None

    def mounted_shares(self) -> list[Any]:
        return []

    async def refresh(self, volume_id: str, share: object = None) -> None:
        seen = self.on_share
        read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reads.append(read)
        await read
        if seen:
            self.listed.add(volume_id)
        else:
            self.listed.discard(volume_id)


class Peer:
    host_id = "b"


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_an_announcement_during_a_refresh_is_read_after_it() -> None:
    """Host a snapshots volume v (b's refresh reads it, slowly), then deletes it. The
    delete's announcement comes while the first read is under way: a second refresh in
    parallel could finish first, and the older read would bring the volume back. Here the
    second waits for the first and is the last word: v is gone on b."""
    store = Store()
    follower = ClusterFollower(store, None, Peer(), lambda: None)  # type: ignore[arg-type]
    follower._changed_elsewhere("v", "a")  # the snapshot
    await settle()
    assert len(store.reads) == 1
    store.on_share = False  # a deletes v, and says so
    follower._changed_elsewhere("v", "a")
    follower._changed_elsewhere("v", "a")  # announcements pile up: one more read, not two
    await settle()
    assert len(store.reads) == 1, "a second read began beside the first"
    store.reads[0].set_result(None)
    await settle()
    assert len(store.reads) == 2
    store.reads[1].set_result(None)
    await settle()
    assert store.listed == set()
    assert not follower._again  # nothing left pending
    store.listed.add("v")  # say it came back: a later change is read again
    follower._changed_elsewhere("v", "c")
    await settle()
    assert len(store.reads) == 3
    store.reads[2].set_result(None)
    await settle()


async def test_an_announcement_while_this_host_uses_the_lock_is_read_after_it() -> None:
    """Host a deletes volume v and says so just as b takes v's lock for a call that is
    refused (Busy: a still held it a moment ago) without reading the share. Skipping the
    read would leave b listing v until its next rescan (cluster_fire found b behind on
    volumes a had changed, 15 s after the hosts settled). It is read once b lets the lock
    go."""
    store = Store()
    store.on_share = False
    follower = ClusterFollower(store, None, Peer(), lambda: None)  # type: ignore[arg-type]
    store.locks.used.add("v")  # b's call has the lock's use
    follower._changed_elsewhere("v", "a")
    await settle()
    assert store.reads == []
    store.locks.used.discard("v")  # refused: let go
    follower._released("v")
    await settle()
    assert len(store.reads) == 1
    store.reads[0].set_result(None)
    await settle()
    assert store.listed == set()
    follower._released("v")  # a later release with nothing announced reads nothing
    await settle()
    assert len(store.reads) == 1


async def test_this_hosts_own_announcements_are_not_read_back() -> None:
    store = Store()
    follower = ClusterFollower(store, None, Peer(), lambda: None)  # type: ignore[arg-type]
    follower._changed_elsewhere("v", "b")
    await settle()
    assert store.reads == []


class Client:
    def __init__(self) -> None:
        self.down = True
        self.sent: list[str] = []

    def put(self, key: str, value: str) -> None:
        if self.down:
            raise ConnectionRefusedError("etcd is restarting")
        self.sent.append(key)


async def test_a_change_etcd_did_not_take_is_told_once_it_answers() -> None:
    """A delete finished just as etcd went away: its announcement failed. Dropping it
    would leave every other host listing the volume until its next share rescan; it is
    kept, and sent after the next lease renewal that works (once per volume)."""
    coordination = Coordination("etcd3+http://127.0.0.1:1", "a", 6)
    client = Client()
    coordination.coordinator = type("Coordinator", (), {"client": client})()
    coordination.healthy = True
    await coordination.announce("v1")
    await coordination.announce("v1")
    coordination.healthy = False  # cut off: not even tried
    await coordination.announce("v2")
    assert client.sent == []
    client.down, coordination.healthy = False, True
    coordination._announce_again()  # what a renewal that worked does
    assert coordination._resending is not None
    await coordination._resending
    assert client.sent == [f"{CHANGES}v1", f"{CHANGES}v2"]
    coordination._announce_again()  # nothing left to tell
    assert client.sent == [f"{CHANGES}v1", f"{CHANGES}v2"]
    coordination.executor.shutdown()
    coordination.renewer.shutdown()


async def test_a_lock_refused_busy_tells_the_follower_once_it_is_let_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ClusterLocks: a call refused Busy (another host holds the volume) lets go
    of this host's own lock before ``on_released`` is told, so the follower sees the lock
    free and reads what was announced meanwhile."""
    coordination = Coordination("etcd3+http://127.0.0.1:1", "b", 6)
    locks = ClusterLocks(tmp_path, coordination)

    @contextlib.asynccontextmanager
    async def held_elsewhere(name: str, wait: bool, brief: bool) -> AsyncIterator[int]:
        raise Busy(f"volume {name} is being changed by host a")
        yield 0  # pragma: no cover

    monkeypatch.setattr(locks, "_cluster_lock", held_elsewhere)
    seen: list[bool] = []
    locks.on_released.append(lambda volume_id: seen.append(locks.busy(volume_id)))
    with pytest.raises(Busy):
        async with locks.volume("v", wait=False):
            pass
    assert seen == [False]
    coordination.executor.shutdown()
    coordination.renewer.shutdown()


async def test_a_renewal_that_works_past_the_deadline_catches_up() -> None:
    """The event loop stalled past half the lease (not the whole lease): steps were refused
    meanwhile, and no fence was noticed, as the renewal that came next worked. The host
    still reads the shares again and finishes its refused operations (``on_back``)."""
    coordination = Coordination("etcd3+http://127.0.0.1:1", "a", 6)
    coordination.healthy = coordination.joined = True
    coordination._last_renewal = time.monotonic() - 4  # the stall: 4 s of a 6 s lease
    coordination._heartbeat_once = lambda: True  # type: ignore[method-assign]
    fenced: list[int] = []
    back = asyncio.Event()
    coordination.on_lost.append(lambda: fenced.append(1))
    coordination.on_back.append(back.set)
    renewing = asyncio.get_running_loop().create_task(coordination._renew())
    try:
        await asyncio.wait_for(back.wait(), 2)
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    assert fenced == [] and coordination.fresh
    coordination.executor.shutdown()
    coordination.renewer.shutdown()

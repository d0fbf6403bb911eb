"""Per-volume locks and atomic writes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.storage.atomic import write_atomic
from hostvold.storage.locks import LocalLocks
from tests.conftest import Host

A = "0a0a0a0a-0000-4000-8000-00000000000a"
B = "0b0b0b0b-0000-4000-8000-00000000000b"


async def test_same_volume_serialised_different_volumes_parallel(tmp_path: Path) -> None:
    locks = LocalLocks(tmp_path / "locks")
    events: list[str] = []

    async def hold(volume_id: str, tag: str) -> None:
        async with locks.volume(volume_id):
            events.append(f"{tag}+")
            await asyncio.sleep(0.05)
            events.append(f"{tag}-")

    await asyncio.gather(hold(A, "a1"), hold(A, "a2"), hold(B, "b"))
    assert events.index("a1-") < events.index("a2+")  # one volume: one at a time
    assert events.index("b+") < events.index("a1-")  # another volume: no waiting
    assert locks._locks == {}  # idle locks are forgotten


async def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    locks = LocalLocks(tmp_path / "locks")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'locks' / (A + '.lock'))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "held"
    entered = asyncio.Event()

    async def take() -> None:
        async with locks.volume(A):
            entered.set()

    task = asyncio.create_task(take())
    await asyncio.sleep(0.2)
    assert not entered.is_set()  # the other process holds it
    holder.stdin.write("\n")
    holder.stdin.flush()
    await asyncio.wait_for(task, 5)
    assert entered.is_set()
    holder.wait()


def test_atomic_write_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "volume-x.info"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b'{"active": "volume-x"}', 0o660)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b'{"active": "volume-x"}'
    assert target.stat().st_mode & 0o777 == 0o660
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume-x.info"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, None, 0o600)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_record_written_here_is_read_back_without_parsing_until_another_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deep volume's record is rewritten at every step: reading back what this process
    just wrote parses nothing; a file another writer puts in its place (or changes in
    place, here with a new size) is parsed again."""
    from hostvold.core.records import VolumeMeta
    from hostvold.storage.metadata import read_meta, write_meta

    vid = "0c0c0c0c-0000-4000-8000-00000000000c"
    meta = VolumeMeta(id=vid, size=1 << 20, format="raw", created="x", state="available",
                      share="/s", active=f"volume-{vid}",
                      snapshots={f"0d0d0d0d-0000-4000-8000-{n:012d}": {"created": "x"}
                                 for n in range(128)})  # over the cache's 4 KiB
    path = tmp_path / f"volume-{vid}.meta"
    write_meta(path, meta, 0o600)
    parsed: list[int] = []
    original = VolumeMeta.model_validate_json
    monkeypatch.setattr(VolumeMeta, "model_validate_json",
                        lambda data: parsed.append(1) or original(data))
    assert read_meta(path) == meta and parsed == []
    other = meta.evolve(state="in-use")
    foreign = tmp_path / "foreign"  # another host's atomic write: a new inode
    foreign.write_bytes(path.read_bytes().replace(b'"available"', b'"in-use"'))
    os.replace(foreign, path)
    assert read_meta(path) == other and parsed == [1]
    with open(path, "r+b") as in_place:  # changed in place: same inode
        data = in_place.read()
        in_place.seek(0)
        in_place.write(data.replace(b'"in-use"', b'"deleting"'))
    assert read_meta(path) == meta.evolve(state="deleting") and parsed == [1, 1]


@pytest.mark.integration
async def test_a_failed_share_leaves_the_others_working(
        tmp_path: Path, host_factory: Callable[..., Host]) -> None:
    host = host_factory(64)
    good_line = host.shares_file.read_text()
    host.shares_file.write_text(f"{tmp_path}/absent.img -t ext4 -o loop\n" + good_line)
    service = await host.start()
    bad, good = service.store.shares
    assert not bad.mounted and "after 3 attempts" in (bad.error or "")
    assert good.mounted
    meta = await service.create_volume(size=1 << 20)
    assert meta.share == good.spec.address

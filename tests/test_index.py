"""The local index (a real SQLite file): writes waiting together land in one transaction,
in order, one failing write is undone alone, and a waited write is durable when it returns."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from hostvold.core.records import VolumeMeta
from hostvold.storage.index import VolumeIndex


def _meta(number: int) -> VolumeMeta:
    vid = f"00000000-0000-4000-8000-{number:012d}"
    return VolumeMeta(id=vid, size=1 << 20, format="raw", created="2026-01-01T00:00:00Z",
                      state="available", share="/srv/share", active=f"volume-{vid}")


async def test_a_burst_commits_together_and_in_order(tmp_path: Path) -> None:
    index = VolumeIndex(tmp_path / "index.sqlite")
    commits: list[int] = []
    index._db.set_trace_callback(lambda sql: commits.append(1) if sql == "COMMIT" else None)
    metas = [_meta(n) for n in range(50)]
    for meta in metas:
        index.queue(index.put, meta, True)
    index.queue(index.remove, metas[0].id)

    def broken() -> None:
        index._db.execute("INSERT INTO volumes (id) VALUES ('half')")  # NOT NULL fails

    failing = index.run(broken)
    marked = index.run(index.mark_inflight, metas[1].id, metas[1].share)
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    await marked
    # written by another connection's eyes: committed, not just visible to the writer
    other = sqlite3.connect(tmp_path / "index.sqlite")
    ids = {row[0] for row in other.execute("SELECT id FROM volumes")}
    assert ids == {m.id for m in metas[1:]}
    assert other.execute("SELECT COUNT(*) FROM inflight").fetchone()[0] == 49
    assert len(commits) < 10, f"{len(commits)} commits for 53 writes"
    index.close()
    assert {m.id for m in VolumeIndex(tmp_path / "index.sqlite").load()} == ids


async def test_writes_from_many_tasks_all_land(tmp_path: Path) -> None:
    index = VolumeIndex(tmp_path / "index.sqlite")
    metas = [_meta(n) for n in range(200)]
    await asyncio.gather(*(index.run(index.put, meta) for meta in metas))
    assert len(index.load()) == 200
    index.close()


async def test_a_cancelled_waiter_leaves_the_others_answered(tmp_path: Path) -> None:
    """A task cancelled while its write waits (Job.Cancel, SIGTERM) must not leave the
    other writes of its batch unanswered; its own write still lands."""
    index = VolumeIndex(tmp_path / "index.sqlite")
    busy = asyncio.ensure_future(index.run(time.sleep, 0.3))  # holds the writer a while
    await asyncio.sleep(0.05)
    cancelled = asyncio.ensure_future(index.run(index.put, _meta(1)))
    waited = asyncio.ensure_future(index.run(index.put, _meta(2)))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.wait_for(waited, 5)
    await busy
    assert {m.id for m in index.load()} == {_meta(1).id, _meta(2).id}
    index.close()
    with pytest.raises(RuntimeError):
        await index.run(index.put, _meta(3))
    with pytest.raises(RuntimeError):  # and again: a failed call leaves nothing waiting
        await index.run(index.put, _meta(3))


async def test_an_operation_notes_itself_once_and_again_after_it_ended(tmp_path: Path) -> None:
    """The in-flight note costs one index write per operation, not one per step; once the
    operation's end is queued the next operation writes (and commits) its note again."""
    index = VolumeIndex(tmp_path / "index.sqlite")
    meta = _meta(7)
    writes: list[str] = []
    index._db.set_trace_callback(lambda sql: writes.append(sql) if "inflight" in sql else None)

    def noted() -> bool:  # another connection's eyes: committed
        with sqlite3.connect(tmp_path / "index.sqlite") as other:
            return other.execute("SELECT 1 FROM inflight WHERE id = ?",
                                 (meta.id,)).fetchone() is not None

    await index.note_inflight(meta.id, meta.share)
    assert noted() and len(writes) == 1
    index.queue_put(meta, True)  # a later step of the same operation
    await index.note_inflight(meta.id, meta.share)
    await index.run(lambda: None)  # every queued write done
    assert len(writes) == 2, writes  # the put only: no second note
    held = threading.Event()
    index.queue(held.wait, 5)  # the writer waits: nothing queued after this is committed
    index.queue_put(meta)  # the operation ended: the note is cleared
    assert noted() and not index.is_inflight(meta.id)  # at once, not once committed
    held.set()
    await index.note_inflight(meta.id, meta.share)  # the next operation
    assert index.is_inflight(meta.id)
    assert noted() and len(writes) == 4, writes
    # a clear queued while a note is on its way: the note is not counted as made
    index.queue_remove(meta.id)
    pending = asyncio.ensure_future(index.note_inflight(meta.id, meta.share))
    await asyncio.sleep(0)
    index.queue_put(meta)
    await pending
    await index.note_inflight(meta.id, meta.share)
    await index.run(lambda: None)
    assert noted()
    index.close()


async def test_only_a_waited_write_pays_for_a_sync(tmp_path: Path) -> None:
    """A queued write (a cache of the shares) commits without a sync of its own; the next
    waited one (an in-flight note) is synced, and takes every earlier commit along; a
    queued write's JSON, when given, is stored as it is; close keeps everything."""
    index = VolumeIndex(tmp_path / "index.sqlite")
    modes: list[str] = []
    index._db.set_trace_callback(lambda sql: modes.append(sql) if "synchronous" in sql else None)
    first, second = _meta(1), _meta(2)
    # the same as queue_put(first, text=...), its landing waited for here
    await asyncio.wrap_future(index._submit(index.put, (first, False, first.model_dump_json()),
                                            durable=False))
    assert modes == ["PRAGMA synchronous=NORMAL"]
    index.queue_put(second)
    await index.note_inflight(first.id, first.share)  # waited: synced, the put along with it
    assert modes[-1] == "PRAGMA synchronous=FULL"
    index.close()
    again = VolumeIndex(tmp_path / "index.sqlite")
    assert {m.id: m for m in again.load()} == {first.id: first, second.id: second}
    assert again.inflight() == [(first.id, first.share)]
    again.close()

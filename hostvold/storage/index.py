"""The local volume index: a SQLite cache of the metadata files on the shares.

It makes listing fast and survives restarts; it is never the source of truth. Deleting it
is safe: the next start rebuilds it from the shares.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hostvold.core.records import VolumeMeta

_SCHEMA = 2
T = TypeVar("T")
log = logging.getLogger(__name__)


class VolumeIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._synchronous = "FULL"
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self.fresh = version != _SCHEMA
        if self.fresh:
            self._db.executescript(f"""
                DROP TABLE IF EXISTS volumes;
                CREATE TABLE volumes (id TEXT PRIMARY KEY, share TEXT NOT NULL,
                                      meta TEXT NOT NULL);
                DROP TABLE IF EXISTS inflight;
                CREATE TABLE inflight (id TEXT PRIMARY KEY, share TEXT NOT NULL);
                PRAGMA user_version = {_SCHEMA};
            """)

        # reads from the event loop have a connection of their own: they see committed data
        # only, and never wait for the writer's open transaction (WAL: readers do not block)
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # writes run in one thread of their own, in order; whatever is waiting when the
        # thread gets to it goes in one transaction, synced only when someone waits for it
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any], bool]] = []
        self._pending_lock = threading.Lock()
        # ids whose in-flight note is committed and not cleared since (event loop only): an
        # operation's later steps need no index write before their metadata file
        self._noted: set[str] = set()
        self._noting: dict[str, object] = {}
        # ids whose note's removal is queued: is_inflight answers for the queue, not for a
        # commit that may still be on its way (a volume must not look busy after its end)
        self._cleared: set[str] = set()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the index's thread, after every write queued before; its
        result once the transaction that holds it is committed (durable)."""
        result: T = await asyncio.wrap_future(self._submit(function, args, durable=True))
        return result

    def queue(self, function: Callable[..., object], *args: Any) -> None:
        """A write not waited for: the index is a cache of the shares, and a write lost
        with the process or the power only makes the next start read that volume from its
        share. Its commit is not synced; the next durable one syncs it along (WAL: the log
        is written in order, and SQLite stays consistent when its tail is lost)."""
        self._submit(function, args, durable=False).add_done_callback(_log_failure)

    def _submit(self, function: Callable[..., Any], args: tuple[Any, ...],
                durable: bool) -> Future[Any]:
        future: Future[Any] = Future()
        entry = (function, args, future, durable)
        with self._pending_lock:
            self._pending.append(entry)
            first = len(self._pending) == 1
        if first:  # otherwise the batch already waiting for the thread takes it along
            try:
                self._writer.submit(self._commit_pending)
            except RuntimeError:  # closed: fail now, and leave no entry that waits forever
                with self._pending_lock:
                    self._pending.remove(entry)
                raise
        return future

    def _commit_pending(self) -> None:
        """Every write waiting, in order, in one transaction: a burst of records from
        parallel operations costs one sync, not one each. Each write has a savepoint of
        its own, so one that fails is undone alone and the others still land."""
        with self._pending_lock:
            taken, self._pending = self._pending, []
        # a waiter cancelled before this point gives up its future: the write still lands
        # (it may be part of a record already on its way), its result goes nowhere
        batch = [(function, args, future if future.set_running_or_notify_cancel() else None)
                 for function, args, future, _durable in taken]
        outcomes: list[tuple[Future[Any] | None, Any, BaseException | None]] = []
        try:
            self._sync_commits(any(durable for *_, durable in taken))
            with self._db:  # commit at the end; roll all back if the commit itself fails
                self._db.execute("BEGIN")
                for function, args, future in batch:
                    self._db.execute("SAVEPOINT write")
                    try:
                        outcomes.append((future, function(*args), None))
                    except Exception as exc:
                        self._db.execute("ROLLBACK TO write")
                        outcomes.append((future, None, exc))
                    self._db.execute("RELEASE write")
        except Exception as exc:
            outcomes = [(future, None, exc) for _, _, future in batch]
        for future, value, error in outcomes:
            if future is None:
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def _sync_commits(self, durable: bool) -> None:
        """FULL: the commit returns once the log is on disk (with every commit before it)."""
        wanted = "FULL" if durable else "NORMAL"
        if wanted != self._synchronous:
            self._db.execute(f"PRAGMA synchronous={wanted}")
            self._synchronous = wanted

    def close(self) -> None:
        self._writer.shutdown(wait=True)  # local disk: the queued writes land first
        self._db.close()
        self._reader.close()

    def load(self) -> list[VolumeMeta]:
        rows = self._reader.execute("SELECT meta FROM volumes").fetchall()
        return [VolumeMeta.model_validate_json(meta) for (meta,) in rows]

    # the writes below run in the writer's transaction (``run`` or ``queue`` them)

    async def note_inflight(self, volume_id: str, share: str) -> None:
        """``mark_inflight``, committed before this returns; once per operation, not once
        per step (a note cleared meanwhile is not counted as made)."""
        if volume_id in self._noted:
            return
        self._cleared.discard(volume_id)
        token = self._noting[volume_id] = object()
        await self.run(self.mark_inflight, volume_id, share)
        if self._noting.get(volume_id) is token:
            del self._noting[volume_id]
            self._noted.add(volume_id)

    def queue_put(self, meta: VolumeMeta, inflight: bool = False,
                  text: str | None = None) -> None:
        """``put`` queued (not waited for); ``text``: ``meta`` as JSON, when already made."""
        if inflight:
            self._cleared.discard(meta.id)
        else:
            self._forget_note(meta.id)
        self.queue(self.put, meta, inflight, text)

    def queue_remove(self, volume_id: str) -> None:
        self._forget_note(volume_id)
        self.queue(self.remove, volume_id)

    def _forget_note(self, volume_id: str) -> None:
        self._noted.discard(volume_id)
        self._noting.pop(volume_id, None)
        self._cleared.add(volume_id)

    def put(self, meta: VolumeMeta, inflight: bool = False, text: str | None = None) -> None:
        """Store ``meta`` (``text``: its JSON, when already made) and, in the same
        transaction, whether an operation on the volume is under way."""
        self._db.execute("INSERT OR REPLACE INTO volumes (id, share, meta) VALUES (?, ?, ?)",
                         (meta.id, meta.share, meta.model_dump_json() if text is None else text))
        if inflight:
            self._db.execute("INSERT OR REPLACE INTO inflight (id, share) VALUES (?, ?)",
                             (meta.id, meta.share))
        else:
            self._db.execute("DELETE FROM inflight WHERE id = ?", (meta.id,))

    def remove(self, volume_id: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))
        self._db.execute("DELETE FROM inflight WHERE id = ?", (volume_id,))

    def mark_inflight(self, volume_id: str, share: str) -> None:
        """Durably note that ``volume_id`` has an operation under way, before its metadata
        file says so: a restart then re-reads that volume from its share, even if the
        crash came before this index heard the rest."""
        self._db.execute("INSERT OR IGNORE INTO inflight (id, share) VALUES (?, ?)",
                         (volume_id, share))

    def is_inflight(self, volume_id: str) -> bool:
        """Whether an operation on the volume is noted (from the event loop)."""
        if volume_id in self._cleared:
            return False
        return self._reader.execute("SELECT 1 FROM inflight WHERE id = ?",
                                    (volume_id,)).fetchone() is not None

    def clear_inflight(self, volume_id: str) -> None:
        self._db.execute("DELETE FROM inflight WHERE id = ?", (volume_id,))

    def inflight(self) -> list[tuple[str, str]]:
        return [(row[0], row[1]) for row in
                self._reader.execute("SELECT id, share FROM inflight ORDER BY id").fetchall()]

    def replace_all(self, metas: Iterable[VolumeMeta]) -> None:
        """Everything the index holds, replaced in one transaction (``run`` it, at start,
        before any operation has noted itself)."""
        self._db.execute("DELETE FROM volumes")
        self._db.execute("DELETE FROM inflight")
        self._db.executemany(
            "INSERT INTO volumes (id, share, meta) VALUES (?, ?, ?)",
            ((m.id, m.share, m.model_dump_json()) for m in metas))
        self.fresh = False


def _log_failure(done: Future[object]) -> None:
    if (error := done.exception()) is not None:
        log.error("index write failed (the next start re-reads the shares): %s", error)

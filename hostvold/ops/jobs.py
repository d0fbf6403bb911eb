"""Jobs: long operations that get an id at once and report progress until they end.

A job runs one coroutine as an asyncio task. Progress comes from qemu-img ``-p`` output
(through :mod:`hostvold.core.progress`); completion is the task's own end, so listeners hear of
it the moment it happens. A finished job keeps its result for ``keep_seconds`` for callers
that ask late, then disappears.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hostvold.core import progress
from hostvold.core.errors import (
    Failed,
    HostvoldError,
    InvalidState,
    NoSpace,
    NotFound,
    StorageUnavailable,
)
from hostvold.core.ids import new_id
from hostvold.storage.shareio import named_storage_error

log = logging.getLogger(__name__)

JobState = Literal["running", "completed", "failed", "cancelled"]
Listener = Callable[["Job", set[str]], None]


@dataclass
class Job:
    id: str
    operation: str
    objects: list[str]
    bytes_total: int = 0
    state: JobState = "running"
    stopped_by: HostvoldError | None = None
    fraction: float = 0.0
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    completed: float = 0.0
    completed_monotonic: float = 0.0
    error_name: str = ""
    error_message: str = ""
    result: Any = None
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    @property
    def bytes_done(self) -> int:
        return int(self.bytes_total * self.fraction)

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        elapsed = (self.completed_monotonic or time.monotonic()) - self.started_monotonic
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def expected_end(self) -> float:
        """Unix time the job should end at this rate (0 when unknown)."""
        if self.state != "running":
            return self.completed
        if self.rate <= 0 or self.fraction <= 0:
            return 0.0
        return time.time() + (self.bytes_total - self.bytes_done) / self.rate

    @property
    def succeeded(self) -> bool:
        return self.state == "completed"


class JobRunner:
    def __init__(self, keep_seconds: float = 600.0) -> None:
        self.keep_seconds = keep_seconds
        self.jobs: dict[str, Job] = {}
        self.listeners: list[Listener] = []
        self.on_added: list[Callable[[Job], None]] = []
        self.on_removed: list[Callable[[Job], None]] = []

    def start(self, operation: str, objects: list[str], work: Callable[[], Awaitable[Any]],
              bytes_total: int = 0) -> Job:
        job = Job(new_id(), operation, objects, bytes_total)
        self.jobs[job.id] = job
        for added in self.on_added:
            added(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job, work))
        self._changed(job, {"State"})
        return job

    async def _run(self, job: Job, work: Callable[[], Awaitable[Any]]) -> None:
        last_sent = [0.0]

        def advance(fraction: float) -> None:
            job.fraction = max(job.fraction, min(fraction, 1.0))
            now = time.monotonic()
            if now - last_sent[0] >= 0.1 or fraction >= 1.0:  # at most 10 signals a second
                last_sent[0] = now
                self._changed(job, {"Progress", "BytesDone", "Rate", "ExpectedEndTime"})

        progress.current.set(advance)
        try:
            job.result = await work()
            job.state, job.fraction = "completed", 1.0
        except asyncio.CancelledError:
            job.state, job.error_name = "cancelled", "Cancelled"
            job.error_message = "the job was cancelled"
            if job.stopped_by is not None:  # not the caller's wish: the storage went away
                job.state, job.error_name = "failed", job.stopped_by.name
                job.error_message = job.stopped_by.message
        except HostvoldError as exc:
            job.state, job.error_name, job.error_message = "failed", exc.name, exc.message
        except OSError as exc:
            named = named_storage_error(exc) or Failed(f"internal error: {exc}")
            if not isinstance(named, (StorageUnavailable, NoSpace)):
                log.exception("job %s (%s) failed unexpectedly", job.id, job.operation)
            job.state, job.error_name, job.error_message = "failed", named.name, named.message
        except Exception as exc:  # a bug: report it, keep the daemon
            log.exception("job %s (%s) failed unexpectedly", job.id, job.operation)
            job.state, job.error_name = "failed", Failed.name
            job.error_message = f"internal error: {type(exc).__name__}: {exc}"
        job.completed, job.completed_monotonic = time.time(), time.monotonic()
        log.info("job %s %s: %s %s", job.id, job.operation, job.state, job.error_message,
                 extra={"JOB_ID": job.id})
        self._changed(job, {"State", "Progress", "BytesDone", "Rate", "ExpectedEndTime",
                            "Error", "Objects", "CompletedTimestamp",
                            "CompletedTimestampMonotonic"})
        asyncio.get_running_loop().call_later(self.keep_seconds, self._forget, job.id)

    def _changed(self, job: Job, names: set[str]) -> None:
        for listener in self.listeners:
            try:
                listener(job, names)
            except Exception:  # one broken listener must not silence the others
                log.exception("job listener failed for job %s", job.id)

    def _forget(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            for removed in self.on_removed:
                removed(job)

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} does not exist (finished jobs are kept "
                           f"{self.keep_seconds:.0f} s)") from None

    def cancel(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.state != "running" or job.task is None:
            raise InvalidState(f"job {job_id} is {job.state}, not running")
        job.task.cancel()

    def stop_where(self, touches: Callable[[Job], bool], reason: HostvoldError) -> int:
        """Stop the running jobs ``touches`` picks, at their next recoverable step; they
        end failed with ``reason``. The number stopped."""
        stopped = 0
        for job in self.jobs.values():
            if job.state == "running" and job.task is not None and touches(job):
                job.stopped_by = reason
                job.task.cancel()
                stopped += 1
        return stopped

    async def cancel_all(self) -> None:
        """Cancel every running job and wait until each has reached a safe state."""
        tasks = [job.task for job in self.jobs.values()
                 if job.state == "running" and job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

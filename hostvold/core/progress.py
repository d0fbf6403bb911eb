"""Progress reporting from deep inside an operation to the job that runs it.

The job sets a reporter in a context variable for the task it runs; the qemu-img edge
reports ``-p`` output to it. Operations stay free of job plumbing, and a call outside a job
reports to nobody.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

Reporter = Callable[[float], None]

current: ContextVar[Reporter | None] = ContextVar("hostvold_progress", default=None)


def report(fraction: float) -> None:
    reporter = current.get()
    if reporter is not None:
        reporter(fraction)

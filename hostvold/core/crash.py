"""Crash injection for tests: ``HOSTVOLD_CRASH_AT=<step>`` makes the process die at once
(``os._exit``, no cleanup, no flush) when it reaches that named step.

Every durable operation calls :func:`point` after each side effect and after each state it
persists; the crash tests run each operation once per named point and check that the next
start repairs everything.
"""

from __future__ import annotations

import os
import sys

CRASH_EXIT_STATUS = 86


def point(name: str) -> None:
    if os.environ.get("HOSTVOLD_CRASH_AT") == name:
        sys.stderr.write(f"hostvold: crash injected at {name}\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_STATUS)

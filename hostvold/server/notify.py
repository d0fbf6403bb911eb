"""systemd readiness and status notifications (a no-op when not run by systemd)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from systemd import daemon as _sd  # type: ignore[attr-defined]


def notify(*lines: str) -> None:
    """Best effort, as sd_notify(3) itself: a manager that went away (the socket refuses)
    must never fail the operation that reported its progress."""
    if os.environ.get("NOTIFY_SOCKET"):
        with contextlib.suppress(OSError):
            _sd.notify("\n".join(lines))


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def status(text: str) -> None:
    notify(f"STATUS={text}")


def stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping")


def watchdog_interval() -> float | None:
    """Seconds between pings: 40% of the timeout systemd gave us, so that even a late
    wake-up keeps within the half that sd_watchdog_enabled(3) asks for (None: no watchdog)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) * 0.4 / 1_000_000


def start_watchdog() -> asyncio.Task[None] | None:
    """Ping the watchdog from the event loop itself: a stuck loop stops the pings."""
    interval = watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())

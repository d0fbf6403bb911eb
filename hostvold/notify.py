"""systemd readiness and status notifications (a no-op when not run by systemd)."""

from __future__ import annotations

import os

from systemd import daemon as _sd  # type: ignore[attr-defined]


def notify(*lines: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        _sd.notify("\n".join(lines))


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def status(text: str) -> None:
    notify(f"STATUS={text}")


def stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping")

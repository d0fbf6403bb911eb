"""hostvolctl's wait for a job when the daemon leaves first (found by bench/cluster_fire.py:
"Future exception was never retrieved ... CliError" on hostvolctl's stderr when the daemon
stopped before the wait began). Pure logic: a fake client, a real event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
from dbus_fast import Message

from hostvold.client.connection import JobWaiter


class Client:
    def __init__(self) -> None:
        self.handlers: list[Any] = []


def daemon_left() -> Message:
    return Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus",
                              "NameOwnerChanged", "sss", ["org.hostvold1", ":1.7", ""])


async def test_a_daemon_gone_before_the_wait_leaves_no_unretrieved_error(
        caplog: pytest.LogCaptureFixture) -> None:
    waiter = JobWaiter(Client(), show_progress=False)  # type: ignore[arg-type]
    waiter._on_signal(daemon_left())
    assert waiter.done.done()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del waiter
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_the_wait_still_says_the_daemon_left() -> None:
    from hostvold.client.wire import CliError

    waiter = JobWaiter(Client(), show_progress=False)  # type: ignore[arg-type]
    waiter._on_signal(daemon_left())
    with pytest.raises(CliError, match="hostvold stopped while the job ran"):
        await waiter.done

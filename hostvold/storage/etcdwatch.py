"""A watch on a range of etcd keys that outlives etcd: restarts, cut links, lost streams.

etcd's watch is one long HTTP stream (the v3 JSON gateway). When etcd restarts the stream
ends, and the client's own watcher thread just ends with it: every later change would go
unheard. Here one thread per watch reads the stream and, when it ends, opens it again from
the revision after the last one it saw (a second later, until etcd answers). Events that
may still have been missed (a stream that was dead before it was noticed: a cut link
stays silent) are made up for by ``on_gap``, called on the loop after every reconnection:
the caller reads what the watch stands for again. :meth:`restart` drops a stream that may
be dead without saying so (after this host's session came back).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
CONNECT_SECONDS = 5.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(value: str) -> str:
    return base64.b64decode(value).decode(errors="replace") if value else ""


def prefix_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class PrefixWatch:
    def __init__(self, client: Any, prefix: str, on_event: Callable[[str, str], None],
                 on_gap: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.prefix = client, prefix
        self.on_event, self.on_gap, self.loop = on_event, on_gap, loop
        self._stopped = threading.Event()
        self._response: Any = None
        self._revision = 0  # the newest revision seen: a new stream starts after it
        self._thread = threading.Thread(target=self._run, name=f"etcd watch {prefix}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._drop()

    def restart(self) -> None:
        """Open the stream again (it reconnects, then ``on_gap`` is called)."""
        self._drop()

    def _drop(self) -> None:
        response = self._response
        if response is None:
            return
        with contextlib.suppress(Exception):  # wakes the reader blocked in recv
            sock = socket.fromfd(response.raw.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(Exception):
            response.close()

    def _run(self) -> None:
        opened_before = failed = False
        while not self._stopped.is_set():
            try:
                self._response = self._open()
                if opened_before or failed:  # what happened meanwhile: read again
                    self.loop.call_soon_threadsafe(self.on_gap)
                opened_before = True
                self._read(self._response)
            except Exception as exc:  # etcd away, the stream cut: open it again
                failed = True
                log.debug("etcd watch on %s ended: %s", self.prefix, exc)
            if not self._stopped.is_set():
                log.warning("etcd watch on %s ended; opened again", self.prefix)
                self._stopped.wait(RETRY_SECONDS)

    def _open(self) -> Any:
        request: dict[str, Any] = {"key": _b64(self.prefix),
                                   "range_end": _b64(prefix_end(self.prefix))}
        if self._revision:
            request["start_revision"] = self._revision + 1
        return self.client.session.post(self.client.get_url("/watch"),
                                        json={"create_request": request}, stream=True,
                                        timeout=(CONNECT_SECONDS, None))

    def _read(self, response: Any) -> None:
        for line in response.iter_lines():
            if self._stopped.is_set():
                return
            if not line.strip():
                continue
            result = json.loads(line).get("result", {})
            if result.get("canceled"):  # compacted past our revision, or etcd's data gone
                self._revision = 0
                raise ConnectionError(f"etcd cancelled the watch: {result}")
            for event in result.get("events", []):
                kv = event.get("kv", {})
                self._revision = max(self._revision, int(kv.get("mod_revision", 0)))
                key, value = _text(kv.get("key", "")), _text(kv.get("value", ""))
                if key.startswith(self.prefix):
                    self.loop.call_soon_threadsafe(self.on_event, key, value)
            self._revision = max(self._revision,
                                 int(result.get("header", {}).get("revision", 0)))

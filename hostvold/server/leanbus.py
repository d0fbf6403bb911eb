"""dbus-fast's asyncio bus with method handlers that cost less per exported object.

dbus-fast makes, for every method of every exported object, a closure holding six cells;
with one object per volume that is about a third of the memory a volume costs (SPEC 15,
P6: at most 10 KiB per volume). Here each method of an interface has one handler, shared
by every object that exports it: it finds its object from the message's path (dbus-fast
chose the handler from that same path a moment before) and does what dbus-fast's closure
does: run the coroutine, keep it referenced until it ends, reply with its result, or let
``send_reply`` turn its exception into an error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageFlag
from dbus_fast.aio import MessageBus
from dbus_fast.message_bus import _block_unexpected_reply
from dbus_fast.service import ServiceInterface, _Method

SendReply = Any  # dbus-fast's SendReply: callable, and a context manager for errors


Handler = Callable[[Message, SendReply], None]


class LeanMessageBus(MessageBus):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared_handlers: dict[tuple[str, _Method], Handler] = {}

    def _make_method_handler(self, interface: ServiceInterface, method: _Method) -> Handler:
        if not inspect.iscoroutinefunction(method.fn):
            handler: Handler = super()._make_method_handler(interface, method)
            return handler
        key = (interface.name, method)
        if key not in self._shared_handlers:
            self._shared_handlers[key] = functools.partial(self._call_coroutine,
                                                           interface.name, method)
        return self._shared_handlers[key]

    def _call_coroutine(self, name: str, method: _Method, message: Message,
                        send_reply: SendReply) -> None:
        interface = self._path_exports[str(message.path)][name]
        args = ServiceInterface._msg_body_to_args(message) if message.unix_fds else message.body
        future: asyncio.Future[Any] = asyncio.ensure_future(method.fn(interface, *args))
        self._pending_futures.add(future)
        if send_reply is _block_unexpected_reply or \
                message.flags & MessageFlag.NO_REPLY_EXPECTED:
            future.add_done_callback(self._future_exception_no_reply)
            return

        def done(finished: asyncio.Future[Any]) -> None:
            with send_reply:  # an exception becomes the error reply
                body, fds = ServiceInterface._fn_result_to_body(
                    finished.result(), method.out_signature_tree,
                    replace_fds=self._negotiate_unix_fd)
                reply = Message.new_method_return(message, method.out_signature, body, fds)
                if not fds:
                    send_reply(reply)
                    return
                # a descriptor a method returns is the caller's: ours closes once sent
                self.send(reply).add_done_callback(lambda _: _close_all(fds))

        future.add_done_callback(done)
        future.add_done_callback(self._pending_futures.discard)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

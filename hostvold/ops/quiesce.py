"""Guest filesystem freeze around a live snapshot, through the guest agent.

libvirt waits for the agent without end unless the domain has a response timeout, so each
freeze sets one. A freeze that timed out is not gone, though: it waits in the agent's
channel, and a hung agent that wakes up carries it out with nobody left to thaw. So after
a freeze or a thaw that the agent left unanswered, a thaw is asked again, each ask waiting
up to the timeout for the agent, until one is answered or the domain is gone. The commands
of one channel are carried out in order, so that thaw lands after any late freeze. A call
refused at once (no agent configured or connected) sent nothing and leaves nothing behind.
The snapshot waits for a freeze no longer than the timeout, although libvirt may wait
longer (its sync, then the command): a freeze still asked is followed, then thawed.
One freeze runs at a time per domain (two volumes of one guest share its agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import libvirt

from hostvold.core import crash
from hostvold.core.errors import DomainGone, Failed, HypervisorError, HypervisorUnavailable
from hostvold.virt.guest import Guest

log = logging.getLogger(__name__)


UNANSWERED = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_TIMEOUT}


class QuiesceFailed(Failed):
    name = "QuiesceFailed"


class Quiescer:
    def __init__(self, policy: str, timeout: int) -> None:
        self.policy = policy  # try | require | never
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._thawing: dict[str, asyncio.Task[None]] = {}

    def _lock(self, guest: Guest) -> asyncio.Lock:
        return self._locks.setdefault(guest.uuid, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def frozen(self, guest: Guest, policy: str | None = None) -> AsyncIterator[bool]:
        """The guest's filesystems frozen for the body, by the policy (``policy``: this
        call's own); yields whether they are. ``require`` raises QuiesceFailed when the
        agent does not freeze them."""
        policy = policy or self.policy
        if policy == "never":
            yield False
            return
        async with self._lock(guest):
            asked = asyncio.get_running_loop().time()
            freezing = asyncio.ensure_future(guest.freeze(self.timeout))
            try:  # libvirt may wait several times the timeout (its sync, then the command)
                await asyncio.wait_for(asyncio.shield(freezing), self.timeout)
                frozen = True
                crash.point("live-create-snapshot:frozen")
            except (HypervisorError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):  # still asked: followed, then thawed
                    self._thaw_when_answered(guest, after=freezing)
                    reason = f"no answer from the agent within {self.timeout} s"
                else:
                    if self._unanswered(exc, asked):
                        self._thaw_when_answered(guest)  # the freeze may still land
                    reason = exc.message
                if policy == "require":
                    raise QuiesceFailed(
                        f"quiesce=require but the guest agent of {guest.name} did not freeze "
                        f"the filesystems: {reason}") from None
                log.warning("no freeze for %s (%s): crash-consistent snapshot", guest.name,
                            reason, extra={"DOMAIN": guest.name})
                frozen = False
            except BaseException:  # cancelled while the freeze was asked: a thaw follows it
                self._thaw_when_answered(guest, after=freezing)
                raise
            try:
                yield frozen
            finally:
                if frozen:
                    asked = asyncio.get_running_loop().time()
                    try:
                        await guest.thaw()
                    except HypervisorError as exc:
                        if self._unanswered(exc, asked):
                            log.error("thaw of %s unanswered (%s): asked again until the "
                                      "agent answers", guest.name, exc.message,
                                      extra={"DOMAIN": guest.name})
                            self._thaw_when_answered(guest)
                        else:  # answered: nothing of ours waits in its channel
                            log.warning("thaw of %s: %s", guest.name, exc.message,
                                        extra={"DOMAIN": guest.name})

    def _unanswered(self, error: HypervisorError, asked: float) -> bool:
        """Whether the agent may have got the command without answering it: libvirt's
        "not responding", after waiting (not refused at once)."""
        waited = asyncio.get_running_loop().time() - asked
        if isinstance(error, HypervisorUnavailable):  # libvirt away: nobody knows
            return True
        return error.code in UNANSWERED and waited >= self.timeout / 2

    def _thaw_when_answered(self, guest: Guest, after: asyncio.Future[None] | None = None
                            ) -> None:
        running = self._thawing.get(guest.uuid)
        if running is None or running.done():
            self._thawing[guest.uuid] = asyncio.get_running_loop().create_task(
                self._thaw_until_answered(guest, after))

    async def _thaw_until_answered(self, guest: Guest,
                                   after: asyncio.Future[None] | None = None) -> None:
        """``after``: a freeze given up on, followed first (whatever it did, the guest may
        be frozen when it ends, or the agent may still hold the command)."""
        if after is not None:
            with contextlib.suppress(Exception):
                await after
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            try:
                async with self._lock(guest):
                    await guest.thaw()
                log.info("guest agent of %s answered a thaw", guest.name,
                         extra={"DOMAIN": guest.name})
                return
            except DomainGone:
                return
            except HypervisorError as exc:
                if exc.code not in UNANSWERED and not isinstance(exc, HypervisorUnavailable):
                    return  # the agent answered (or there is none): nothing waits in it
                try:
                    if not await guest.is_running():
                        return
                except HypervisorError:
                    pass  # libvirt away for now: ask again
            # each ask waits up to the timeout for a hung agent; one refused at once (no
            # agent connected, libvirt reconnecting) is asked again after the same time
            await asyncio.sleep(max(0.0, self.timeout - (loop.time() - asked)))

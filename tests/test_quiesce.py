"""The quiesce rules with a stand-in guest (pure logic; the real guest's agent is driven in
tests/test_real_guest.py): when a thaw must follow a failed freeze, and when not."""

from __future__ import annotations

import asyncio

import libvirt
import pytest

from hostvold.core.errors import DomainGone, HypervisorError
from hostvold.ops.quiesce import QuiesceFailed, Quiescer

UNRESPONSIVE = libvirt.VIR_ERR_AGENT_UNRESPONSIVE


class AgentGuest:
    """A domain whose agent hangs for ``hang`` seconds of each call, or refuses at once."""

    name = "guest"
    uuid = "u-1"

    def __init__(self, hang: float = 0.0, refuse: int = 0, thaw_hangs: int = 0,
                 late: float = 0.0) -> None:
        self.hang = hang
        self.late = late  # a freeze libvirt carries out this late (its sync, then the call)
        self.refuse = refuse
        self.thaw_hangs = thaw_hangs  # thaws left unanswered before one is answered
        self.calls: list[str] = []
        self.running = True

    async def freeze(self, timeout: int) -> None:
        self.calls.append("freeze")
        if self.refuse:
            raise HypervisorError("not configured", self.refuse)
        if self.late:
            await asyncio.sleep(self.late)
            self.calls.append("frozen")
        if self.hang:
            await asyncio.sleep(min(self.hang, timeout))
            raise HypervisorError("Guest agent is not responding", UNRESPONSIVE)

    async def thaw(self) -> None:
        self.calls.append("thaw")
        if not self.running:
            raise DomainGone("gone", libvirt.VIR_ERR_NO_DOMAIN)
        if self.thaw_hangs:
            self.thaw_hangs -= 1
            await asyncio.sleep(0.2)
            raise HypervisorError("Guest agent is not responding", UNRESPONSIVE)

    async def is_running(self) -> bool:
        return self.running


async def settle(quiescer: Quiescer) -> None:
    for task in list(quiescer._thawing.values()):
        await asyncio.wait_for(task, 5)


async def test_an_unanswered_freeze_is_followed_by_thaws_until_one_is_answered() -> None:
    quiescer = Quiescer("require", timeout=1)
    guest = AgentGuest(hang=5, thaw_hangs=2)
    with pytest.raises(QuiesceFailed):
        async with quiescer.frozen(guest):  # type: ignore[arg-type]
            pytest.fail("the body runs only when frozen")
    await settle(quiescer)
    assert guest.calls == ["freeze", "thaw", "thaw", "thaw"]


async def test_a_freeze_refused_at_once_leaves_nothing_to_thaw() -> None:
    quiescer = Quiescer("try", timeout=1)
    guest = AgentGuest(refuse=libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)
    async with quiescer.frozen(guest) as frozen:  # type: ignore[arg-type]
        assert frozen is False
    assert guest.calls == ["freeze"] and not quiescer._thawing


async def test_the_thaws_stop_when_the_domain_is_gone() -> None:
    quiescer = Quiescer("try", timeout=1)
    guest = AgentGuest(hang=5)
    guest.running = False
    async with quiescer.frozen(guest) as frozen:  # type: ignore[arg-type]
        assert frozen is False
    await settle(quiescer)
    assert guest.calls == ["freeze", "thaw"]


async def test_a_frozen_body_is_always_thawed() -> None:
    quiescer = Quiescer("require", timeout=1)
    guest = AgentGuest()
    with pytest.raises(RuntimeError):
        async with quiescer.frozen(guest) as frozen:  # type: ignore[arg-type]
            assert frozen is True
            raise RuntimeError("the snapshot failed")
    assert guest.calls == ["freeze", "thaw"]


async def test_never_asks_the_agent_anything() -> None:
    guest = AgentGuest()
    async with Quiescer("never", timeout=1).frozen(guest) as frozen:  # type: ignore[arg-type]
        assert frozen is False
    assert guest.calls == []


async def test_a_freeze_that_lands_late_is_not_waited_for_but_is_thawed() -> None:
    """libvirt may wait several times the agent timeout: the snapshot stops waiting at the
    timeout (require: refused), and the freeze, once it lands, is thawed."""
    quiescer = Quiescer("require", timeout=1)
    guest = AgentGuest(late=2.5)
    started = asyncio.get_running_loop().time()
    with pytest.raises(QuiesceFailed, match="no answer from the agent within 1 s"):
        async with quiescer.frozen(guest):  # type: ignore[arg-type]
            pytest.fail("the body runs only when frozen")
    assert asyncio.get_running_loop().time() - started < 1.5
    await settle(quiescer)
    assert guest.calls == ["freeze", "frozen", "thaw"]

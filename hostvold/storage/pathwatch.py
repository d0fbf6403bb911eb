"""The network path to each share's host, followed through netlink (SPEC section 10).

A dead NFS server is noticed by a process only when its ``stat`` sleeps forever. The
kernel knows sooner when the path itself is gone: the route to the host disappears or its
outgoing link goes down. hostvold asks the kernel the route to each network share's host
(a netlink route lookup, as ``ip route get`` does) and looks again whenever a link, address
or route changes: the share is ``unreachable`` the moment its path is, and ``up`` again when
it returns. No traffic is sent; nothing is polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from hostvold.storage.mounts import Share

log = logging.getLogger(__name__)

GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_ROUTE
          | RTMGRP_IPV6_IFADDR)
IFF_UP = 0x1
RTN_UNICAST, RTN_LOCAL = 1, 2
RESOLVE_SECONDS = 5.0


async def resolve(host: str) -> str | None:
    """The address of ``host``: itself when it is one, else the resolver's first answer."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM), RESOLVE_SECONDS)
    except (OSError, TimeoutError) as exc:
        log.warning("cannot resolve share host %s (%s); its path is not watched", host, exc)
        return None
    return str(infos[0][4][0]) if infos else None


class PathWatch:
    """Keeps ``Share.path`` of every network share in step with the kernel's routes."""

    def __init__(self, shares: list[Share]) -> None:
        self.shares = [share for share in shares if share.spec.host is not None]
        self.targets: dict[Share, str] = {}
        self._home: dict[str, int] = {}  # address -> the link it was last reached through
        self._events: Any = None
        self._requests: Any = None
        self._task: asyncio.Task[None] | None = None
        self._again = asyncio.Event()

    async def start(self) -> None:
        if not self.shares:
            return
        for share in self.shares:
            assert share.spec.host is not None
            address = await resolve(share.spec.host)
            if address is not None:
                self.targets[share] = address
        self._events = AsyncIPRoute()
        await self._events.bind(groups=GROUPS)
        self._requests = AsyncIPRoute()
        await self.evaluate()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for sock in (self._events, self._requests):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()

    async def _follow(self) -> None:
        """Every batch of link, address and route events: look at each path again."""
        while True:
            try:
                async for _event in self._events.get():
                    await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("netlink events failed; looking again")
                await self.evaluate()

    async def evaluate(self) -> None:
        for share, address in self.targets.items():
            try:
                state, detail = await self.lookup(address)
            except Exception:
                log.exception("route lookup to %s failed", address)
                continue
            share.set_path(state, detail)

    async def lookup(self, address: str) -> tuple[str, str]:
        """``("up", how)`` or ``("unreachable", why)`` for the path to ``address``.

        The link a share was reached through is remembered: when it goes down, the kernel
        drops its routes and would send the traffic by the default route instead, which
        does not lead to a storage network. So a share whose own link is down counts as
        unreachable even when some other route exists; a route that moves to another link
        while the old one stays up (a re-routed network) is followed."""
        try:
            routes = list(await self._requests.route("get", dst=address))
        except NetlinkError as exc:
            return "unreachable", f"no route to {address}: {os.strerror(exc.code)}"
        if not routes:
            return "unreachable", f"no route to {address}"
        route = routes[0]
        if route.get("type", RTN_UNICAST) not in (RTN_UNICAST, RTN_LOCAL):
            return "unreachable", f"the route to {address} rejects traffic"
        index = route.get("RTA_OIF")
        home = self._home.get(address)
        if home is not None and home != index:
            name, down = await self._link_down(home)
            if name is None:  # that link was deleted: the new route is the share's path
                home = None
            elif down is not None:
                return "unreachable", f"link {name} to {address} is {down}"
        name, down = await self._link_down(index)
        if down is not None:
            return "unreachable", f"link {name} to {address} is {down}"
        if home is None:
            self._home[address] = index
        gateway = route.get("RTA_GATEWAY")
        return "up", f"to {address} via {name}" + (f" gateway {gateway}" if gateway else "")

    async def _link_down(self, index: int) -> tuple[str | None, str | None]:
        """The link's name, and why it cannot carry traffic (None when it can)."""
        try:
            links = list(await self._requests.link("get", index=index))
        except NetlinkError:
            return None, "gone"
        if not links:
            return None, "gone"
        link = links[0]
        operstate = str(link.get("IFLA_OPERSTATE") or "UNKNOWN")
        if not link["flags"] & IFF_UP or operstate not in ("UP", "UNKNOWN"):
            return link.get("IFLA_IFNAME"), operstate.lower()
        return link.get("IFLA_IFNAME"), None

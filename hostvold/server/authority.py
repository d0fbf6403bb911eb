"""Who may call which method: root and ``admin_group`` always, anyone else as polkit says.

Every method that changes something belongs to one polkit action (:data:`ACTIONS`, the
actions of ``systemd/org.hostvold1.policy``), as UDisks2's do. Root and members of
``admin_group`` are let through at once, without a round trip, as before polkit. Anyone else
is asked about through polkitd's ``CheckAuthorization``, with the caller's bus name as the
subject (polkitd reads its uid, pid and session itself), on the daemon's own connection: an
awaited call, never blocking the loop. A site grants a role some actions with a rule in
``/etc/polkit-1/rules.d``. When polkitd does not answer on the bus, or ``authorization =
group``, the admin group alone decides; the daemon says at start which is in force.

dbus-fast does not tell a method who called it: a message handler that runs before dispatch
keeps each call's sender (and whether it allows an interactive authorization) in context
variables, which the task running the method inherits.
"""

from __future__ import annotations

import asyncio
import grp
import logging
from contextvars import ContextVar
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold.core.errors import NotAuthorized
from hostvold.server.bus import caller, remember_call

log = logging.getLogger(__name__)

READ = "org.hostvold1.read"
SNAPSHOT = "org.hostvold1.snapshot"
VOLUME_MANAGE = "org.hostvold1.volume-manage"
ATTACH = "org.hostvold1.attach"
REPAIR = "org.hostvold1.repair"

ACTIONS: dict[str, str] = {  # method (as the call sites name it) -> polkit action
    "CreateVolume": VOLUME_MANAGE,
    "ImportVolume": VOLUME_MANAGE,
    "CreateGroupSnapshot": SNAPSHOT,
    "Volume.CreateSnapshot": SNAPSHOT,
    "Volume.ExportChanges": SNAPSHOT,
    "Volume.Extend": VOLUME_MANAGE,
    "Volume.Clone": VOLUME_MANAGE,
    "Volume.Export": VOLUME_MANAGE,
    "Volume.Revert": VOLUME_MANAGE,
    "Volume.Delete": VOLUME_MANAGE,
    "Volume.Attach": ATTACH,
    "Volume.Detach": ATTACH,
    "Volume.Repair": REPAIR,
    "Snapshot.Delete": SNAPSHOT,
    "Snapshot.CreateVolume": VOLUME_MANAGE,
    "GroupSnapshot.Delete": SNAPSHOT,
    "GroupSnapshot.Revert": VOLUME_MANAGE,
    "GroupSnapshot.CreateVolumes": VOLUME_MANAGE,
}
JOB_ACTIONS: dict[str, str] = {  # a job's operation -> the action that may cancel it
    "create-snapshot": SNAPSHOT, "delete-snapshot": SNAPSHOT, "export-changes": SNAPSHOT,
    "create-group-snapshot": SNAPSHOT, "delete-group-snapshot": SNAPSHOT,
    "attach": ATTACH, "detach": ATTACH, "repair": REPAIR,
}

POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_GONE = ("org.freedesktop.DBus.Error.ServiceUnknown",
               "org.freedesktop.DBus.Error.NameHasNoOwner")
POLKIT_SECONDS = 25.0  # polkit's own answer may wait for a password typed into an agent
ALLOW_USER_INTERACTION = 1  # CheckAuthorization's flag

interactive: ContextVar[bool] = ContextVar("hostvold_interactive", default=False)


def action_of(method: str) -> str:
    """The polkit action of a method; a method not in the table needs the widest one."""
    if method.startswith("Job.Cancel "):
        return JOB_ACTIONS.get(method.split(" ", 1)[1], VOLUME_MANAGE)
    return ACTIONS.get(method, VOLUME_MANAGE)


class Authorizer:
    """Changes need root, ``admin_group``, or polkit's yes for the method's action."""

    def __init__(self, bus: MessageBus, admin_group: str, use_polkit: bool = True) -> None:
        self.bus = bus
        self.admin_group = admin_group
        self.use_polkit = use_polkit
        try:
            self.admin_gid: int | None = grp.getgrnam(admin_group).gr_gid
        except KeyError:
            log.warning("admin_group %s does not exist: only root may change volumes",
                        admin_group)
            self.admin_gid = None
        bus.add_message_handler(self._remember)

    @staticmethod
    def _remember(message: Message) -> bool | None:
        if message.message_type == MessageType.METHOD_CALL:
            interactive.set(bool(message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION))
        return remember_call(message)

    async def describe(self) -> str:
        """Which authority is in force, in one line for the start-up log."""
        if not self.use_polkit:
            return (f"authorization: root and group {self.admin_group!r} "
                    "(authorization = group: polkit is not asked)")
        if await self._polkit_present():
            return (f"authorization: root and group {self.admin_group!r}, then polkit "
                    f"({POLKIT}) for everyone else")
        return (f"authorization: root and group {self.admin_group!r} only: polkitd does not "
                "answer on this bus (it is asked again at each call of anyone else)")

    async def _polkit_present(self) -> bool:
        for member in ("NameHasOwner", "ListActivatableNames"):
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member=member,
                signature="s" if member == "NameHasOwner" else "",
                body=[POLKIT] if member == "NameHasOwner" else []))
            if reply is not None and reply.message_type == MessageType.METHOD_RETURN and (
                    reply.body[0] is True or POLKIT in (reply.body[0] or [])):
                return True
        return False

    async def credentials(self, sender: str) -> dict[str, Any]:
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionCredentials",
            signature="s", body=[sender]))
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise NotAuthorized("the caller's credentials could not be read")
        return {key: variant.value for key, variant in reply.body[0].items()}

    async def require_admin(self, method: str) -> int:
        """The caller's uid when root, in the admin group, or granted the method's polkit
        action; else NotAuthorized naming the action."""
        return await self._decide(method, action_of(method))

    async def require_read(self, method: str) -> None:
        """Reading is open (SPEC section 9) unless polkit says no to org.hostvold1.read:
        a site may close it with a rule."""
        await self._decide(method, READ)

    async def _decide(self, method: str, action: str) -> int:
        sender = caller.get()
        if sender is None:
            raise NotAuthorized("the caller is unknown")
        creds = await self.credentials(sender)
        uid = creds.get("UnixUserID")
        if not isinstance(uid, int):
            raise NotAuthorized("the caller's uid could not be read")
        if uid == 0 or (self.admin_gid is not None
                        and self.admin_gid in creds.get("UnixGroupIDs", [])):
            return uid
        answer = await self._polkit_says(sender, action) if self.use_polkit else None
        if answer or (action == READ and answer is None):
            return uid
        how = "refused by polkit" if answer is False else "not root, not in the group"
        log.warning("refused %s (%s) to uid %s: %s %s", method, action, uid, how,
                    self.admin_group)
        if answer is None:
            raise NotAuthorized(f"{method} needs root or membership of the group "
                                f"{self.admin_group!r}")
        raise NotAuthorized(f"{method} needs root, membership of the group "
                            f"{self.admin_group!r}, or polkit's authorization for {action}")

    async def _polkit_says(self, sender: str, action: str) -> bool | None:
        """polkit's answer for the caller and action; None when polkitd is not there."""
        flags = ALLOW_USER_INTERACTION if interactive.get() else 0
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        try:
            reply = await asyncio.wait_for(self.bus.call(Message(
                destination=POLKIT, path="/org/freedesktop/PolicyKit1/Authority",
                interface=f"{POLKIT}.Authority", member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us", body=[subject, action, {}, flags, ""])),
                POLKIT_SECONDS)
        except TimeoutError:
            log.warning("polkit did not answer about %s within %.0f s", action,
                        POLKIT_SECONDS)
            return False
        if reply is None:
            return None
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in POLKIT_GONE:
                return None
            log.warning("polkit could not decide %s: %s %s", action, reply.error_name,
                        reply.body[0] if reply.body else "")
            return False
        authorized, _challenge, _details = reply.body[0]
        return bool(authorized)

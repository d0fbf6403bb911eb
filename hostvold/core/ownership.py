"""Which host holds an attached volume (pure, no I/O): decided from what this host's
libvirt says now and the record on the share, never from the record alone.

A host claims a volume as soon as its own libvirt runs a domain that uses it, whatever the
record says about another host (a guest started here after its host died, a migration that
landed here). While a domain is on the move, both hosts' libvirts run it: the volume is
``migrating``, the record naming the host the guest comes from (``host``) and, once known,
the one it goes to (``to``). A host frees a volume only when the record says the volume is
its own: a domain that left by migration, or a record another host has since claimed, is
left for the host where the guest now runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Migration = Literal["in", "out"] | None
Attachment = dict[str, Any] | None


@dataclass(frozen=True)
class Here:
    """The domain of this host's libvirt that has the volume open."""

    domain: str
    target: str
    migration: Migration = None  # "in": arriving here, "out": leaving from here


def decide(state: str, attachment: Attachment, me: str, here: Here | None,
           left_by_migration: bool = False) -> tuple[str, Attachment] | None:
    """The volume's new (state, attachment), or None to leave the record as it is.
    ``left_by_migration``: this host's domain of the record just stopped, migrated away."""
    recorded = attachment or {}
    host, to = recorded.get("host"), recorded.get("to", "")
    if here is not None:
        mark = {"domain": here.domain, "target": here.target}
        if here.migration is None:
            return "in-use", {**mark, "host": me}
        if here.migration == "out":
            if state == "in-use" and host not in (None, me):
                return None  # the destination holds it already
            return "migrating", {**mark, "host": me, "to": to if state == "migrating" else ""}
        if state == "migrating" and to == me:
            return None
        source = host if state in ("in-use", "migrating") and host not in (None, me) else ""
        return "migrating", {**mark, "host": source, "to": me}
    if state == "in-use" and host in (None, me):
        if left_by_migration:  # runs elsewhere now; that host's hostvold claims it
            return "migrating", {**recorded, "host": me, "to": ""}
        return "available", None
    if state == "migrating" and to == me:  # it was coming here and did not stay
        if host:
            return "in-use", {"domain": recorded.get("domain"),
                              "target": recorded.get("target"), "host": host}
        return "available", None
    return None

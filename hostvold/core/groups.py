"""Group snapshots, the pure part: what a caller may ask for, and what the shares say a
group is (SPEC section 5a).

A group is a set of ordinary snapshots, one per member volume, taken at one point in
time. Each member's record (its volume's metadata file, on its own share) carries the
whole membership, ``group_members`` (volume id -> snapshot id), so any host rebuilds every
group from the shares alone. A group is whole when every member it lists is present;
otherwise it is shown with a named problem per missing member, never as whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from hostvold.core.errors import InvalidArgument
from hostvold.core.ids import valid_id
from hostvold.core.records import VolumeMeta

Consistency = Literal["crash", "quiesced", "suspend"]
QuiescePolicy = Literal["try", "require", "never"]

# the marks a member's snapshot record carries
GROUP = "group"
MEMBERS = "group_members"
CONSISTENCY = "consistency"
DELETING = "group_deleting"  # the group is being deleted: the member goes too
REVERTING = "group_reverting"  # the group revert owes this member its revert


class GroupRequest(BaseModel):
    """``Manager.CreateGroupSnapshot``'s arguments, checked before anything is looked up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    volumes: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    consistency: Consistency = "crash"
    quiesce: QuiescePolicy | None = None  # None: the daemon's [libvirt] quiesce

    @field_validator("volumes")
    @classmethod
    def _ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({valid_id(v, "volume id") for v in value}))

    @field_validator("domains")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name or len(name) > 200 or "/" in name or "\0" in name:
                raise ValueError(f"domain name {name!r} is not a libvirt domain name")
        return tuple(dict.fromkeys(value))

    @classmethod
    def parse(cls, **values: Any) -> GroupRequest:
        try:
            request = cls(**values)
        except ValueError as exc:  # pydantic's ValidationError is one
            raise InvalidArgument(str(exc).splitlines()[-1].strip() if "\n" in str(exc)
                                  else str(exc)) from None
        if not request.volumes and not request.domains:
            raise InvalidArgument("a group snapshot needs volumes, a domain or domains")
        if request.consistency == "quiesced" and request.quiesce == "never":
            raise InvalidArgument("consistency=quiesced cannot go with quiesce=never")
        return request

    def policy(self, default: str) -> str:
        """The quiesce policy each guest gets."""
        if self.consistency == "quiesced":
            return "require"
        return self.quiesce or default


@dataclass(frozen=True)
class Member:
    volume_id: str
    snapshot_id: str


@dataclass
class GroupView:
    """A group as the shares show it."""

    id: str
    members: list[Member] = field(default_factory=list)  # every member it lists
    present: set[str] = field(default_factory=set)  # volume ids whose snapshot is there
    created: str = ""
    consistency: str = "crash"
    quiesced: bool = True
    paused: float = 0.0  # suspend: seconds the domains were paused
    problems: list[str] = field(default_factory=list)
    deleting: bool = False


def member_extra(group_id: str, members: dict[str, str], consistency: str,
                 paused: float | None = None) -> dict[str, Any]:
    """What a member's snapshot record carries about its group."""
    return {GROUP: group_id, MEMBERS: dict(sorted(members.items())), CONSISTENCY: consistency,
            **({"paused": round(paused, 6)} if paused is not None else {})}


def collect_groups(volumes: Iterable[VolumeMeta]) -> dict[str, GroupView]:
    """Every group the volume records show, with what is missing from each."""
    groups: dict[str, GroupView] = {}
    for meta in volumes:
        for sid, extra in meta.snapshots.items():
            group_id = extra.get(GROUP)
            if not isinstance(group_id, str):
                continue
            view = groups.setdefault(group_id, GroupView(group_id))
            listed = extra.get(MEMBERS)
            if isinstance(listed, dict) and not view.members:
                view.members = [Member(str(v), str(s)) for v, s in sorted(listed.items())]
            if isinstance(listed, dict) and listed.get(meta.id) == sid:
                view.present.add(meta.id)
            view.created = max(view.created, str(extra.get("created", "")))
            view.consistency = str(extra.get(CONSISTENCY, "crash"))
            view.quiesced = view.quiesced and bool(extra.get("quiesced", False))
            view.paused = max(view.paused, float(extra.get("paused") or 0.0))
            view.deleting = view.deleting or bool(extra.get(DELETING))
    for view in groups.values():
        view.problems = [f"member {m.volume_id}: its snapshot {m.snapshot_id} is gone"
                         for m in view.members if m.volume_id not in view.present]
        if view.deleting:
            view.problems.insert(0, "being deleted: the members left go at the next "
                                 "Delete or start")
    return groups


def groups_of(meta: VolumeMeta | None) -> set[str]:
    """The groups a volume's snapshots belong to."""
    if meta is None:
        return set()
    return {str(extra[GROUP]) for extra in meta.snapshots.values() if GROUP in extra}

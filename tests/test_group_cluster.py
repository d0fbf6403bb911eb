"""Group snapshots on many hosts (SPEC sections 5a and 8): two hosts over one share with a
real etcd. Overlapping groups started at the same moment on two hosts both complete, one
after the other (members are locked in volume-id order on every host, each lock waited
for), and every group is whole on both hosts; a member attached on another host is refused
there with InUse naming that host."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.cluster_fixtures import Cluster
from tests.test_cluster import share_of
from tests.test_dbus import Cli

pytestmark = pytest.mark.integration

DEADLOCK = 60.0  # seconds: far beyond what two small offline groups take one after the other
GROUP = "org.hostvold1.GroupSnapshot"


def volume_path(volume_id: str) -> str:
    return f"/org/hostvold1/volumes/{volume_id.replace('-', '_')}"


def plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@dataclass
class Ended:
    """One CreateGroupSnapshot job as its Completed signal told it."""

    host: str
    volumes: list[str]
    success: bool
    error: str
    message: str
    seconds: float  # from the moment both calls went out
    objects: list[str]

    @property
    def group(self) -> str:
        return self.objects[-1] if self.objects else ""


class Connection:
    """One bus connection to one host, with the Completed signals of its jobs."""

    def __init__(self, host: str, bus: MessageBus) -> None:
        self.host = host
        self.bus = bus
        self.completed: dict[str, tuple[bool, str, str, float]] = {}
        self.changed = asyncio.Event()
        bus.add_message_handler(self._on_message)

    @classmethod
    async def open(cls, host: str, address: str) -> Connection:
        made = cls(host, await MessageBus(bus_address=address).connect())
        await made.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                        ["type='signal',interface='org.hostvold1.Job',member='Completed'"],
                        destination="org.freedesktop.DBus")
        return made

    def _on_message(self, message: Message) -> None:
        if message.interface == "org.hostvold1.Job" and message.member == "Completed":
            success, error, text = message.body
            self.completed[str(message.path)] = (bool(success), str(error), str(text),
                                                 time.monotonic())
            self.changed.set()

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None,
                   destination: str = "org.hostvold1") -> list[Any]:
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or []))
        assert reply is not None
        assert reply.message_type == MessageType.METHOD_RETURN, \
            (self.host, member, reply.error_name, reply.body)
        return list(reply.body)

    async def start_group(self, volume_ids: list[str]) -> str:
        (job,) = await self.call("/org/hostvold1", "org.hostvold1.Manager",
                                 "CreateGroupSnapshot", "aoa{sv}",
                                 [[volume_path(v) for v in volume_ids], {}])
        return str(job)

    async def start_delete(self, group: str) -> str:
        (job,) = await self.call(group, GROUP, "Delete", "a{sv}", [{}])
        return str(job)

    async def ended(self, job: str, volumes: list[str], started: float) -> Ended:
        """The job's end (its Completed signal, waited for, never polled)."""
        while job not in self.completed:
            self.changed.clear()
            await self.changed.wait()
        success, error, text, at = self.completed[job]
        (objects,) = await self.call(job, "org.freedesktop.DBus.Properties", "Get", "ss",
                                     ["org.hostvold1.Job", "Objects"])
        return Ended(self.host, volumes, success, error, text, at - started, plain(objects))

    async def objects(self) -> dict[str, dict[str, Any]]:
        (managed,) = await self.call("/org/hostvold1", "org.freedesktop.DBus.ObjectManager",
                                     "GetManagedObjects")
        return {str(path): plain(interfaces) for path, interfaces in managed.items()}


async def connect(clis: dict[str, Cli]) -> dict[str, Connection]:
    return {host: await Connection.open(host, cli.address) for host, cli in clis.items()}


async def at_once(connections: dict[str, Connection],
                  requests: list[tuple[str, list[str]]]) -> list[Ended]:
    """A CreateGroupSnapshot per (host, volumes), all sent at the same moment; their ends,
    within DEADLOCK seconds."""
    started = time.monotonic()
    jobs = await asyncio.gather(*(connections[host].start_group(volumes)
                                  for host, volumes in requests))
    return list(await asyncio.wait_for(asyncio.gather(*(
        connections[host].ended(job, volumes, started)
        for job, (host, volumes) in zip(jobs, requests, strict=True))), DEADLOCK))


def whole(groups: dict[str, dict[str, Any]], expected: dict[str, set[str]]) -> bool:
    return set(groups) == set(expected) and all(
        not props["Problems"] and len(props["Snapshots"]) == len(expected[path])
        and set(props["Volumes"]) == {volume_path(v) for v in expected[path]}
        for path, props in groups.items())


def snapshots_of(objects: dict[str, dict[str, Any]], volume_id: str) -> set[str]:
    return {path for path, interfaces in objects.items()
            if interfaces.get("org.hostvold1.Snapshot", {}).get("Volume")
            == volume_path(volume_id)}


ROUNDS = [  # (host, members) started at the same moment; members named in opposite orders
    [("a", [0, 1]), ("b", [1, 2])],
    [("a", [2, 1, 0]), ("b", [0, 1, 2])],
    [("a", [1, 0]), ("b", [0, 1])],
    [("a", [0, 2]), ("b", [2, 1, 0])],
]


def test_overlapping_groups_on_two_hosts_both_complete(cluster: Cluster) -> None:
    """Rounds of two groups sharing members, started at the same moment on hosts a and b,
    with the members named in opposite orders: each round both jobs succeed (never Busy,
    never past the deadlock bound), and every group taken so far is whole on both hosts,
    each shared member holding one snapshot per group it is in. Then every group is
    deleted, from a and b in turn, leaving every volume as it was."""
    run_rounds(cluster, deletes_at_once=False)


def test_overlapping_group_deletes_on_two_hosts_both_complete(cluster: Cluster) -> None:
    """As above, then the two groups of each round deleted at the same moment, one from
    each host: both deletes succeed and no member snapshot is left behind."""
    run_rounds(cluster, deletes_at_once=True)


def run_rounds(cluster: Cluster, deletes_at_once: bool) -> None:
    _, cli_a = cluster.add("a")
    volumes = sorted(cli_a.json("create", "16M")["Id"] for _ in range(3))
    _, cli_b = cluster.add("b")  # knows the volumes from the share
    rounds = [[(host, [volumes[i] for i in members]) for host, members in requests]
              for requests in ROUNDS]
    report = asyncio.run(_overlapping_rounds({"a": cli_a, "b": cli_b}, rounds, volumes,
                                             deletes_at_once))
    print("\n" + report)
    share = share_of(cluster)
    for volume_id in volumes:  # every group deleted: each volume back on its base alone
        info = share / f"volume-{volume_id}.info"
        assert not info.exists() or json.loads(info.read_text()) == \
            {"active": f"volume-{volume_id}"}, info.read_text()
        assert sorted(p.name for p in share.iterdir() if p.name.startswith(
            f"volume-{volume_id}") and not p.name.endswith((".info", ".meta"))) == \
            [f"volume-{volume_id}"]


async def _overlapping_rounds(clis: dict[str, Cli], rounds: list[list[tuple[str, list[str]]]],
                              volumes: list[str], deletes_at_once: bool) -> str:
    connections = await connect(clis)
    lines = []
    try:
        expected: dict[str, set[str]] = {}
        for number, requests in enumerate(rounds, 1):
            ended = await at_once(connections, requests)
            assert all(e.success for e in ended), [(e.host, e.error, e.message) for e in ended]
            assert all("/groups/" in e.group for e in ended), [e.objects for e in ended]
            for e in ended:
                expected[e.group] = set(e.volumes)
            lines.append(f"round {number}: " + ", ".join(
                f"host {e.host} ({len(e.volumes)} members) done at {e.seconds * 1000:.0f} ms"
                for e in sorted(ended, key=lambda e: e.seconds)))
            await check_groups(connections, expected, volumes)

        # the groups of each round deleted, both at once or one after the other
        order = list(expected)
        while order:
            batch, order = (order[:2], order[2:]) if deletes_at_once else (order[:1], order[1:])
            hosts = "ab" if deletes_at_once else "ab"[len(order) % 2]
            started = time.monotonic()
            jobs = await asyncio.gather(*(connections[host].start_delete(group)
                                          for host, group in zip(hosts, batch, strict=True)))
            ended = await asyncio.wait_for(asyncio.gather(*(
                connections[host].ended(job, [], started)
                for host, job in zip(hosts, jobs, strict=True))), DEADLOCK)
            assert all(e.success for e in ended), [(e.host, e.error, e.message) for e in ended]
            for group in batch:
                del expected[group]
            await check_groups(connections, expected, volumes)
        lines.append(f"{len(ROUNDS) * 2} groups deleted, "
                     f"{'two at once from a and b' if deletes_at_once else 'one at a time'}")
    finally:
        for connection in connections.values():
            connection.bus.disconnect()
    return "\n".join(lines)


async def check_groups(connections: dict[str, Connection], expected: dict[str, set[str]],
                       volumes: list[str], within: float = 5.0) -> None:
    """Every host exports exactly the ``expected`` groups (path -> member volume ids), each
    whole, and each volume's snapshots are exactly its snapshots in them (none left
    behind), once the other host has heard of the last change (within a few seconds)."""
    deadline = time.monotonic() + within
    while True:
        problems: list[tuple[Any, ...]] = []
        for host, connection in connections.items():
            objects = await connection.objects()
            groups = {path: interfaces[GROUP] for path, interfaces in objects.items()
                      if GROUP in interfaces}
            if not whole(groups, expected):
                problems.append((host, "groups", groups, expected))
                continue
            for volume_id in volumes:
                theirs = {groups[g]["Snapshots"][
                    groups[g]["Volumes"].index(volume_path(volume_id))]
                    for g, members in expected.items() if volume_id in members}
                if snapshots_of(objects, volume_id) != theirs:
                    problems.append((host, volume_id, snapshots_of(objects, volume_id), theirs))
        if not problems:
            return
        assert time.monotonic() < deadline, problems
        await asyncio.sleep(0.05)  # the test's own look; the daemons never poll


def test_a_member_attached_on_another_host_is_refused_there(live_cluster: Cluster,
                                                             domain: str) -> None:
    """A group on host b (whose libvirt, the test driver, does not run the domain) of a
    volume attached on host a and a detached one: the job fails with InUse naming host a
    and the domain, and leaves nothing behind; on host a the same group is taken."""
    _, cli_a = live_cluster.add("a", "[libvirt]\nquiesce = never\n")
    attached = cli_a.json("create", "16M")["Id"]
    detached = cli_a.json("create", "16M")["Id"]
    cli_a.json("attach", attached, domain)
    _, cli_b = live_cluster.add("b", "[libvirt]\nuri = test:///default\n")
    asyncio.run(_refused_on_b({"a": cli_a, "b": cli_b}, attached, detached, domain))


async def _refused_on_b(clis: dict[str, Cli], attached: str, detached: str,
                        domain: str) -> None:
    connections = await connect(clis)
    try:
        (refused,) = await at_once(connections, [("b", [detached, attached])])
        assert not refused.success and refused.error.endswith(".InUse"), refused
        assert "host a" in refused.message and domain in refused.message, refused.message
        assert not any("/groups/" in path for path in refused.objects), refused.objects
        await check_groups(connections, {}, [attached, detached], within=0)
        (taken,) = await at_once(connections, [("a", [detached, attached])])
        assert taken.success, taken
        await check_groups(connections, {taken.group: {attached, detached}},
                           [attached, detached])
    finally:
        for connection in connections.values():
            connection.bus.disconnect()

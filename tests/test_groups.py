"""Group snapshots of detached volumes (SPEC section 5a), with real bytes on real loop
ext4 shares: one point in time across volumes, new volumes from it, revert, delete, a crash
at every named step, and groups rebuilt from the shares alone. Live members (one
transaction per domain, freeze, suspend) are in ``tests/test_group_guest.py``."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable

import pytest

from hostvold.core.errors import InvalidArgument, InvalidState, NeedsRepair, NotFound
from hostvold.core.groups import MEMBERS, GroupRequest, GroupView, collect_groups
from hostvold.core.ids import new_id
from hostvold.ops.operations import Operations
from hostvold.storage.infofile import read_info
from tests.conftest import Host
from tests.snapshot_lab import Lab, check_consistent, expected_reads, make_lab, qemu_io
from tests.test_crash import crash_run

pytestmark = pytest.mark.integration


@pytest.fixture
async def host(host_factory: Callable[..., Host]) -> AsyncIterator[Host]:
    host = host_factory(256, 256)
    await host.start()
    yield host
    host.stop()


async def make_labs(ops: Operations, count: int = 3) -> list[Lab]:
    """Volumes with one snapshot each and data written after it; the first is qcow2."""
    return [await make_lab(ops, ops, 1, "qcow2" if i == 0 else "raw") for i in range(count)]


def view_of(ops: Operations, group_id: str) -> GroupView | None:
    return collect_groups(ops.store.list_volumes()).get(group_id)


async def take(ops: Operations, labs: list[Lab], group_id: str | None = None) -> str:
    outcome = await ops.groups.create(GroupRequest.parse(
        volumes=[lab.volume_id for lab in labs]), group_id)
    for lab in labs:
        lab.generation_of[outcome.members[lab.volume_id]] = lab.current
    return outcome.group_id


def check_all(ops: Operations, labs: list[Lab]) -> None:
    for lab in labs:
        lab.rebind(ops, ops)
        lab.check_data()
        check_consistent(ops, lab.volume_id)


def test_a_request_names_what_it_takes() -> None:
    with pytest.raises(InvalidArgument, match="needs volumes"):
        GroupRequest.parse()
    with pytest.raises(InvalidArgument, match="UUID"):
        GroupRequest.parse(volumes=["../etc"])
    with pytest.raises(InvalidArgument):
        GroupRequest.parse(volumes=[new_id()], consistency="eventual")
    with pytest.raises(InvalidArgument, match="quiesce=never"):
        GroupRequest.parse(volumes=[new_id()], consistency="quiesced", quiesce="never")
    assert GroupRequest.parse(domains=["vm"], consistency="quiesced").policy("never") == \
        "require"


async def test_a_group_is_one_point_in_time_across_volumes(host: Host) -> None:
    ops = host.ops
    labs = await make_labs(ops)
    group_id = await take(ops, labs)
    at_group = {lab.volume_id: lab.current for lab in labs}
    for lab in labs:
        lab.write()
    view = view_of(ops, group_id)
    assert view is not None and not view.problems and not view.quiesced
    assert {m.volume_id for m in view.members} == view.present == set(at_group)
    assert view.consistency == "crash"
    for lab in labs:  # each member is an ordinary snapshot, with the membership beside it
        meta = ops.store.get_volume(lab.volume_id)
        sid = next(m.snapshot_id for m in view.members if m.volume_id == lab.volume_id)
        assert meta.snapshots[sid][MEMBERS] == {m.volume_id: m.snapshot_id
                                                for m in view.members}
        assert sid in {s.id for s in await ops.store.list_snapshots(lab.volume_id)}
    check_all(ops, labs)

    copies = await ops.group_changes.create_volumes(group_id)
    assert len(copies) == 3
    for copy, member in zip(copies, view.members, strict=True):
        files = ops.store.files_of(copy)
        qemu_io(files.base, copy.format, expected_reads(at_group[member.volume_id]),
                read_only=True)

    await ops.group_changes.revert(group_id)
    for lab in labs:
        lab.current = at_group[lab.volume_id]
    check_all(ops, labs)

    await ops.group_changes.delete(group_id)
    assert view_of(ops, group_id) is None
    by_id = {lab.volume_id: lab for lab in labs}
    for member in view.members:
        del by_id[member.volume_id].generation_of[member.snapshot_id]
    check_all(ops, labs)
    with pytest.raises(NotFound):
        ops.group_changes.view(group_id)


async def test_a_revert_changes_all_or_none(host: Host) -> None:
    ops = host.ops
    labs = await make_labs(ops)
    group_id = await take(ops, labs)
    for lab in labs:
        lab.write()
    await labs[2].snapshot()  # the group's snapshot is no longer this member's newest
    with pytest.raises(InvalidState, match="not its newest"):
        await ops.group_changes.revert(group_id)
    check_all(ops, labs)  # nobody was reverted


async def test_members_are_locked_in_one_order_so_groups_never_deadlock(host: Host) -> None:
    ops = host.ops
    labs = await make_labs(ops, 4)
    first = GroupRequest.parse(volumes=[lab.volume_id for lab in labs[:3]])
    second = GroupRequest.parse(volumes=[lab.volume_id for lab in labs[1:]])
    outcomes = await asyncio.wait_for(asyncio.gather(
        *(ops.groups.create(r) for r in (first, second, first, second))), 60)
    assert len({o.group_id for o in outcomes}) == 4
    for outcome in outcomes:
        view = view_of(ops, outcome.group_id)
        assert view is not None and not view.problems


async def test_groups_come_back_from_the_shares(host: Host) -> None:
    ops = host.ops
    labs = await make_labs(ops)
    group_id = await take(ops, labs)
    host.stop()
    for path in host.state_dir.glob("index.sqlite*"):
        path.unlink()
    ops = await host.start()
    view = view_of(ops, group_id)
    assert view is not None and not view.problems and len(view.present) == 3
    check_all(ops, labs)

    gone = labs[1]  # an operator removes one member's files by hand
    files = ops.store.files_of(ops.store.get_volume(gone.volume_id))
    for path in files.existing():
        path.unlink()
    ops = await host.start()
    view = view_of(ops, group_id)
    assert view is not None
    sid = next(m.snapshot_id for m in view.members if m.volume_id == gone.volume_id)
    assert view.problems == [f"member {gone.volume_id}: its snapshot {sid} is gone"]
    with pytest.raises(NeedsRepair, match="not whole"):
        await ops.group_changes.revert(group_id)
    await ops.group_changes.delete(group_id)  # what is left of it can still go
    assert view_of(ops, group_id) is None
    shutil.rmtree(files.directory, ignore_errors=True)


CREATE_STEPS = ["intent", "overlays", "paused", "switch", "member-info", "member-finished"]
CASES = [*[("group-create", f"group-snapshot:{s}") for s in CREATE_STEPS],
         *[("group-delete", p) for p in ("group-delete:marked", "delete-snapshot:commit",
                                         "delete-snapshot:info", "group-delete:member")],
         *[("group-revert", p) for p in ("group-revert:marked", "revert:overlay",
                                         "group-revert:member")]]


@pytest.mark.parametrize(("operation", "point"), CASES, ids=[p for _, p in CASES])
async def test_a_crash_leaves_every_group_whole_or_absent(
        host_factory: Callable[..., Host], operation: str, point: str) -> None:
    host = host_factory(256, 256)
    ops = await host.start()
    labs = await make_labs(ops)
    group_id = new_id()
    volumes = [lab.volume_id for lab in labs]
    if operation == "group-create":
        crash_run(host, operation, point, volumes=volumes, group=group_id)
    else:
        await take(ops, labs, group_id)
        at_group = {lab.volume_id: lab.current for lab in labs}
        for lab in labs:
            lab.write()
        crash_run(host, operation, point, group=group_id)
    ops = await host.start()  # recovery runs here
    view = view_of(ops, group_id)
    if operation == "group-create":
        if view is not None:
            assert not view.problems and len(view.present) == 3
            for lab in labs:
                sid = next(m.snapshot_id for m in view.members if m.volume_id == lab.volume_id)
                lab.generation_of[sid] = lab.current
        else:
            assert not any(len(read_info(lab.files).snapshots) > 1 for lab in labs)
    elif operation == "group-delete":
        assert view is None  # a started delete is finished
        for lab in labs:
            lab.generation_of = {s: g for s, g in lab.generation_of.items()
                                 if s in read_info(lab.files).snapshots}
            assert len(lab.generation_of) == 1
    else:
        assert view is not None and not view.problems  # a started revert is finished
        for lab in labs:
            lab.current = at_group[lab.volume_id]
    check_all(ops, labs)
    group_id = await take(ops, labs)  # usable for the next group
    check_all(ops, labs)

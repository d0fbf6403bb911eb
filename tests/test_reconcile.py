"""The pure merge of a volume's record with what its share says (no files)."""

from __future__ import annotations

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.images import FORMAT_UNCONFIRMED
from hostvold.core.reconcile import ShareView, busy, merge_record, record_changes
from hostvold.core.records import VolumeMeta

V = "11111111-1111-4111-8111-111111111111"
S1, S2, S3 = (f"2222222{i}-2222-4222-8222-222222222222" for i in range(1, 4))
BASE = f"volume-{V}"


def record(**changes: object) -> VolumeMeta:
    meta = VolumeMeta(id=V, size=1 << 20, format="raw", created="2024-01-01T00:00:00+00:00",
                      state="available", share="srv:/export", active=f"{BASE}.{S2}",
                      snapshots={S1: {"created": "t1", "quiesced": True},
                                 S2: {"created": "t2", "quiesced": False}})
    return meta.evolve(**changes)


def test_snapshots_and_active_follow_the_info_file() -> None:
    view = ShareView(SnapshotMap(f"{BASE}.{S3}", {S1: f"{BASE}.{S1}", S3: f"{BASE}.{S3}"}),
                     created={f"{BASE}.{S3}": "t3"})
    merged = merge_record(record(), view)
    assert merged.active == f"{BASE}.{S3}"
    assert merged.snapshots == {S1: {"created": "t1", "quiesced": True},  # its extras kept
                                S3: {"created": "t3", "quiesced": False}}  # overlay's time
    assert (merged.size, merged.format, merged.created) == (1 << 20, "raw",
                                                            "2024-01-01T00:00:00+00:00")
    lines = record_changes(record(), merged)
    assert lines == [f"active file {BASE}.{S2} -> {BASE}.{S3}", f"snapshots gone: {S2}",
                     f"snapshots found: {S3}"]


def test_an_unchanged_share_changes_nothing() -> None:
    meta = record()
    view = ShareView(SnapshotMap(f"{BASE}.{S2}", {S1: f"{BASE}.{S1}", S2: f"{BASE}.{S2}"}))
    assert merge_record(meta, view) == meta
    assert record_changes(meta, meta) == []


def test_problems_are_the_shares_plus_those_it_cannot_judge() -> None:
    unconfirmed = f"{FORMAT_UNCONFIRMED} the base looks like qcow2"
    stale = f"{BASE}.{S3} is not used by the volume (stale overlay)"
    meta = record(problems=["snapshot x: gone", unconfirmed, stale])
    healthy = ShareView(SnapshotMap(f"{BASE}.{S2}", {S1: f"{BASE}.{S1}",
                                                    S2: f"{BASE}.{S2}"}))
    merged = merge_record(meta, healthy)
    assert merged.problems == [unconfirmed, stale]  # the old chain problem is solved
    assert record_changes(meta, merged) == ["problems cleared: snapshot x: gone"]
    damaged = ShareView(None, ["volume.info is empty or truncated (0 bytes); run a repair"])
    hurt = merge_record(record(), damaged)
    assert hurt.problems == damaged.problems
    assert hurt.snapshots == record().snapshots and hurt.active == record().active
    # the same problems in another order: the record's order stays (no rewrite)
    same = ShareView(healthy.chain_map, [stale])
    assert merge_record(record(problems=[unconfirmed, stale]), same).problems == [
        unconfirmed, stale]


def test_busy_and_appearing_volumes() -> None:
    assert busy(record(operation={"name": "delete-snapshot"}))
    assert busy(record(state="creating")) and busy(record(state="deleting"))
    assert not busy(record(state="in-use"))
    assert record_changes(None, record()) == ["volume appeared"]
    assert record_changes(record(), None) == ["volume is gone"]
    assert record_changes(record(), record(size=2 << 20)) == [
        f"size {1 << 20} -> {2 << 20}"]

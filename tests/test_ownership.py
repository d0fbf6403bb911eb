"""Who holds an attached volume, step by step through a migration, a failed one and a host
crash (pure logic; the real two-host runs are tests/test_migration.py)."""

from __future__ import annotations

from hostvold.core.ownership import Here, decide

DOM = {"domain": "vm", "target": "sda"}


def on(host: str, **more: str) -> dict[str, str]:
    return {**DOM, "host": host, **more}


def test_a_migration_from_a_to_b() -> None:
    # B's libvirt starts the incoming domain (paused): B marks the move
    assert decide("in-use", on("a"), "b", Here("vm", "sda", "in")) == \
        ("migrating", on("a", to="b"))
    # A's domain runs on, its migration job going out: the move stays recorded
    assert decide("migrating", on("a", to="b"), "a", Here("vm", "sda", "out")) == \
        ("migrating", on("a", to="b"))
    # B resumes the guest: B holds it
    assert decide("migrating", on("a", to="b"), "b", Here("vm", "sda")) == ("in-use", on("b"))
    # A's QEMU ends, paused or gone: the record is B's now and stays so
    assert decide("in-use", on("b"), "a", Here("vm", "sda", "out")) is None
    assert decide("in-use", on("b"), "a", None, left_by_migration=True) is None


def test_a_failed_migration_goes_back_to_the_source() -> None:
    assert decide("migrating", on("a", to="b"), "b", None) == ("in-use", on("a"))
    assert decide("in-use", on("a"), "a", Here("vm", "sda")) is not None  # claimed as is
    assert decide("in-use", on("a"), "a", Here("vm", "sda")) == ("in-use", on("a"))


def test_a_move_no_hostvold_saw_arrive_is_never_freed() -> None:
    # A marks the move itself when its domain pauses for it, and keeps it when it ends
    assert decide("in-use", on("a"), "a", Here("vm", "sda", "out")) == \
        ("migrating", on("a", to=""))
    assert decide("in-use", on("a"), "a", None, left_by_migration=True) == \
        ("migrating", on("a", to=""))
    assert decide("migrating", on("a", to=""), "a", None) is None
    # B's hostvold starts and finds the guest running there
    assert decide("migrating", on("a", to=""), "b", Here("vm", "sda")) == ("in-use", on("b"))


def test_a_guest_started_elsewhere_after_a_host_crash() -> None:
    assert decide("in-use", on("a"), "b", Here("vm2", "sdb")) == \
        ("in-use", {"domain": "vm2", "target": "sdb", "host": "b"})
    assert decide("in-use", on("b"), "a", None) is None  # A, back, leaves it to B


def test_this_hosts_domain_gone_frees_its_own_volume_only() -> None:
    assert decide("in-use", on("a"), "a", None) == ("available", None)
    assert decide("in-use", on("b"), "a", None) is None
    assert decide("available", None, "a", None) is None

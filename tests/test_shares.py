"""Shares: the shares file, eligibility, choice, and real mounts of loop ext4 images."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.core.errors import NoSpace, StorageUnavailable
from hostvold.core.shares import (
    Candidate,
    Capacity,
    Placement,
    ShareSpec,
    choose_share,
    ineligible_reason,
    parse_shares_file,
    share_hash,
)
from hostvold.storage.mounts import Share, ensure_mounted, mounted_points, unmount

GiB = 1 << 30


def test_shares_file_format() -> None:
    text = """# comment
filer1:/export/a
filer2:/export/with\\040space -o vers=4.1,nconnect=2

/srv/img.raw -t ext4 -o loop
not-a-share
filer3:/export -x bogus
filer1:/export/a
"""
    shares, problems = parse_shares_file(text)
    assert [s.address for s in shares] == ["filer1:/export/a", "filer2:/export/with space",
                                           "/srv/img.raw"]
    assert shares[1].fstype == "nfs" and shares[1].options == "vers=4.1,nconnect=2"
    assert shares[2].fstype == "ext4" and shares[2].options == "loop"
    assert [(p.line, p.reason.split(" ")[0]) for p in problems] == [
        (6, "share"), (7, "unsupported"), (8, "duplicate")]


def test_mount_point_is_md5_of_share_string() -> None:
    # the hash Cinder and Nova use, so existing mounts are found where they are
    spec = ShareSpec("filer1:/export/a")
    expected = hashlib.md5(b"filer1:/export/a").hexdigest()
    assert share_hash(spec.address) == expected
    assert spec.mount_point(Path("/m")) == Path("/m", expected)


def test_eligibility_rules() -> None:
    rules = Placement(reserved_percentage=10, max_over_subscription_ratio=2.0)
    empty = Capacity(total=10 * GiB, free=10 * GiB)
    assert ineligible_reason(empty, 5 * GiB, False, rules) is None
    assert ineligible_reason(empty, 21 * GiB, False, rules) is not None  # beyond 2x
    full = Capacity(total=10 * GiB, free=GiB // 2)  # 95% used > 90% allowed
    assert "reserved_percentage" in (ineligible_reason(full, GiB, False, rules) or "")
    provisioned = Capacity(total=10 * GiB, free=8 * GiB, provisioned=19 * GiB)
    assert ineligible_reason(provisioned, 2 * GiB, False, rules) is not None
    assert ineligible_reason(Capacity(10 * GiB, 3 * GiB), 4 * GiB, True, rules) is not None


def test_choose_least_allocated_eligible() -> None:
    rules = Placement()
    a = Candidate(ShareSpec("a:/x"), Capacity(total=GiB, free=GiB // 2, allocated=GiB // 2))
    b = Candidate(ShareSpec("b:/x"), Capacity(total=GiB, free=GiB, allocated=10))
    c = Candidate(ShareSpec("c:/x"), Capacity(total=GiB, free=0, allocated=0))  # full
    assert choose_share([a, b, c], GiB, False, rules).spec.address == "b:/x"
    with pytest.raises(NoSpace, match="no share can hold"):
        choose_share([a, b, c], 100 * GiB, False, rules)


@pytest.mark.integration
async def test_real_mount_detect_and_failure(tmp_path: Path,
                                             ext4_image: Callable[..., Path]) -> None:
    image = ext4_image("m", 32)
    spec, _ = parse_shares_file(f"{image} -t ext4 -o loop\n{tmp_path}/missing.img -t ext4\n")
    good = Share(spec[0], spec[0].mount_point(tmp_path / "mnt"))
    bad = Share(spec[1], spec[1].mount_point(tmp_path / "mnt"))
    try:
        await ensure_mounted(good, attempts=1)
        assert good.mounted and good.mount_point in mounted_points()
        again = Share(spec[0], good.mount_point)  # a restart finds the existing mount
        await ensure_mounted(again, attempts=1)
        assert again.mounted and again.error is None
        await ensure_mounted(bad, attempts=2)  # fails, reported on that share only
        assert not bad.mounted and "after 2 attempts" in (bad.error or "")
        with pytest.raises(StorageUnavailable, match="not mounted"):
            bad.require()
    finally:
        await unmount(good)
    assert good.mount_point not in mounted_points()

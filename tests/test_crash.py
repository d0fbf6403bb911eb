"""Crash at every named step of every durable operation, then start again.

Each case runs the operation in a process of its own (``tests.crash_driver``) with
``HOSTVOLD_CRASH_AT`` naming one step; the process dies there (exit status 86 proves the
step was reached). The next start must leave: all data readable as before or as after the
operation (never a mix), the info file equal to the chain, no orphan file, and a volume
usable for the next operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostvold.core.crash import CRASH_EXIT_STATUS
from hostvold.core.errors import NotFound
from hostvold.core.ids import new_id
from hostvold.core.layout import VolumeFiles
from hostvold.storage.infofile import read_info
from tests.conftest import Host
from tests.snapshot_lab import SIZE, check_consistent, expected_reads, make_lab, qemu_io

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent

DELETE_STEPS = ["intent", "commit", "relink-recorded", "rebase", "info", "remove-recorded",
                "unlinked"]
CASES: list[tuple[str, str, str]] = [  # (operation, variant, crash point)
    *[("create", "-", f"create:{s}") for s in ("intent", "made")],
    *[("import", "-", f"import:{s}") for s in ("intent", "made")],
    *[("delete", "-", f"delete:{s}") for s in ("intent", "base-removed", "files-removed")],
    *[("extend", "-", f"extend:{s}") for s in ("intent", "grown")],
    *[("create-snapshot", "-", f"create-snapshot:{s}") for s in ("intent", "overlay", "info")],
    *[("delete-snapshot", position, f"delete-snapshot:{s}")
      for position in ("newest", "middle", "oldest", "only") for s in DELETE_STEPS
      if not (s == "rebase" and position in ("newest", "only"))],  # no layer above to relink
    *[("revert", "-", f"revert:{s}") for s in ("intent", "overlay", "replaced")],
    *[("clone", "-", f"clone:{s}") for s in ("intent", "made")],
    *[("create-from-snapshot", "-", f"create-from-snapshot:{s}") for s in ("intent", "made")],
]


def test_crash_point_count() -> None:
    operations = {op for op, _, _ in CASES}
    print(f"\ncrash test: {len(CASES)} crash points over {len(operations)} operations")
    assert len(CASES) >= 40


def crash_run(host: Host, operation: str, point: str, **args: Any) -> None:
    host.stop()  # the driver process owns the state directory until it dies
    env = dict(os.environ, HOSTVOLD_CRASH_AT=point)
    result = subprocess.run([sys.executable, "-m", "tests.crash_driver", str(host.config_file),
                             operation, json.dumps(args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == CRASH_EXIT_STATUS, (
        f"{point} was not reached (exit {result.returncode}): {result.stderr[-2000:]}")


def files_of_id(host: Host, volume_id: str) -> list[str]:
    assert host.daemon is not None and host.daemon.ops is not None
    names = []
    for share in host.daemon.ops.store.shares:
        names += [p.name for p in VolumeFiles.of(share.mount_point,
                                                 host.daemon.ops.store.naming,
                                                 volume_id).existing()]
    return names


def reads_as(path: Path, fmt: str, generation: int) -> bool:
    try:
        qemu_io(path, fmt, expected_reads(generation), read_only=True)
    except (AssertionError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.parametrize(("operation", "variant", "point"), CASES,
                         ids=[f"{point}[{variant}]" for _, variant, point in CASES])
async def test_crash_then_restart(tmp_path: Path, host_factory: Callable[..., Host],
                                  operation: str, variant: str, point: str) -> None:
    host = host_factory(256)
    await host.start()
    assert host.daemon is not None and host.daemon.ops is not None
    lab = await make_lab(host.daemon.ops, host.ops, 1 if variant == "only" else 3)
    ids = sorted(lab.generation_of, key=lab.generation_of.__getitem__)
    target = {"newest": -1, "middle": 1, "oldest": 0, "only": 0}.get(variant, -1)
    new_volume = new_id()
    new_snapshot = new_id()
    image = tmp_path / "image.raw"

    match operation:
        case "create":
            crash_run(host, operation, point, size=SIZE, id=new_volume)
        case "import":
            subprocess.run(["qemu-img", "create", "-f", "raw", str(image), "4M"], check=True)
            crash_run(host, operation, point, source=str(image), id=new_volume)
        case "delete":
            crash_run(host, operation, point, volume=lab.volume_id)
        case "extend":
            crash_run(host, operation, point, volume=lab.volume_id, size=2 * SIZE)
        case "create-snapshot":
            crash_run(host, operation, point, volume=lab.volume_id, snapshot=new_snapshot)
        case "delete-snapshot":
            crash_run(host, operation, point, volume=lab.volume_id, snapshot=ids[target])
        case "revert":
            crash_run(host, operation, point, volume=lab.volume_id, snapshot=ids[-1])
        case "clone":
            crash_run(host, operation, point, volume=lab.volume_id, id=new_volume)
        case "create-from-snapshot":
            crash_run(host, operation, point, volume=lab.volume_id, snapshot=ids[0],
                      id=new_volume)

    volumes = await host.start()  # recovery runs here
    lab.rebind(volumes, host.ops)

    if operation == "delete":
        with pytest.raises(NotFound):
            volumes.store.get_volume(lab.volume_id)
        assert files_of_id(host, lab.volume_id) == []
        return
    if operation in ("create", "import", "clone", "create-from-snapshot"):
        # the caller never heard of success: the new volume is gone, wholly
        with pytest.raises(NotFound):
            volumes.store.get_volume(new_volume)
        assert files_of_id(host, new_volume) == []
    if operation == "create-snapshot":
        if new_snapshot in read_info(lab.files).snapshots:
            lab.generation_of[new_snapshot] = lab.current
        else:
            assert not (lab.files.directory / lab.files.overlay_name(new_snapshot)).exists()
    if operation == "delete-snapshot":
        # recovery rolls a started delete forward; it never stops half way
        del lab.generation_of[ids[target]]
    if operation == "extend":
        assert volumes.store.get_volume(lab.volume_id).size == 2 * SIZE
    if operation == "revert":
        path, fmt = lab.active()
        before, after = reads_as(path, fmt, lab.current), reads_as(path, fmt, 3)
        assert before != after  # exactly one of the two states, never a mix
        if after:
            lab.current = 3

    lab.check_data()
    check_consistent(volumes, lab.volume_id)
    # usable for the next operation
    sid = await lab.snapshot()
    lab.write()
    lab.check_data()
    await lab.snapshots.delete_snapshot(lab.volume_id, sid)
    del lab.generation_of[sid]
    lab.check_data()
    check_consistent(volumes, lab.volume_id)

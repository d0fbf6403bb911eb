"""Changed-block export (SPEC section 5b) with real qemu-img, qemu-nbd and libnbd as the
independent client: restores between any two points in time are exact, the exported set is
the overlays' own allocation, deletes keep it exact or fall back as documented, and nothing
is left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hostvold.core.changes import Extent
from hostvold.core.errors import NotFound
from hostvold.ops.changes import ChangeExports, Export
from hostvold.ops.operations import Operations
from hostvold.storage.changeview import CONTEXT
from hostvold.storage.infofile import read_info
from tests.conftest import Host, need

pytestmark = pytest.mark.integration
MiB = 1 << 20
SIZE = 64 * MiB
READER = Path(__file__).resolve().parent / "nbd_reader.py"


@pytest.fixture
async def host(host_factory: Callable[..., Host]) -> AsyncIterator[Host]:
    need(shutil.which("qemu-nbd") is not None and subprocess.run(
        ["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0,
         "qemu-nbd and python3-libnbd (Debian: qemu-utils python3-libnbd)")
    host = host_factory(512)
    await host.start()
    yield host
    host.stop()


class Timeline:
    """A volume with points in time S1..S4 and a full raw copy of each (and of now)."""

    def __init__(self, ops: Operations, volume_id: str, scratch: Path, seed: int) -> None:
        self.ops, self.volume_id, self.scratch = ops, volume_id, scratch
        self.random = random.Random(seed)
        self.snapshots: list[str] = []
        self.full: dict[str, Path] = {}

    def active(self) -> tuple[Path, str]:
        meta = self.ops.store.get_volume(self.volume_id)
        files = self.ops.store.files_of(meta)
        active = read_info(files).active
        return files.directory / active, meta.format if active == files.base_name else "qcow2"

    def scribble(self) -> None:
        """Seeded writes, zero-writes and discards into the active file."""
        path, fmt = self.active()
        commands = []
        for _ in range(12):
            start = self.random.randrange(0, (SIZE - MiB) // 4096) * 4096
            length = self.random.choice([4096, 65536, 300 * 1024, MiB])
            kind = self.random.random()
            if kind < 0.6:
                commands.append(f"write -P {self.random.randrange(1, 255)} {start} {length}")
            elif kind < 0.8:
                commands.append(f"write -z {start} {length}")
            else:
                commands.append(f"discard {start} {length}")
        argv = ["qemu-io", "-f", fmt, str(path)]
        for command in commands:
            argv += ["-c", command]
        subprocess.run(argv, check=True, capture_output=True)

    def copy_now(self, name: str) -> Path:
        path, fmt = self.active()
        out = self.scratch / f"{name}.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                       check=True)
        self.full[name] = out
        return out

    async def snapshot(self) -> str:
        self.copy_now("pending")
        sid = (await self.ops.create_snapshot(self.volume_id)).id
        self.full[sid] = self.full.pop("pending")
        self.full[sid].rename(self.scratch / f"{sid}.raw")
        self.full[sid] = self.scratch / f"{sid}.raw"
        self.snapshots.append(sid)
        return sid


async def export(exports: ChangeExports, volume_id: str, since: str | None, to: str | None,
                 onto: Path | None, full_if_needed: bool = False
                 ) -> tuple[Export, dict[str, Any], int]:
    """One export read by libnbd (restoring onto ``onto``); the export, what libnbd saw,
    and the changed bytes the job reported once the client left."""
    ready: asyncio.Future[Export] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(exports.export(volume_id, since, to, full_if_needed, ready))
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done and not ready.done():
        task.result()
    result = ready.result()
    try:
        read = await asyncio.to_thread(
            subprocess.run, ["/usr/bin/python3", str(READER), str(result.fd), CONTEXT,
                             str(onto) if onto else "-"],
            pass_fds=(result.fd,), capture_output=True, text=True, timeout=120)
    finally:
        os.close(result.fd)
    assert read.returncode == 0, read.stderr
    changed = await asyncio.wait_for(task, 30)
    return result, json.loads(read.stdout), changed


async def restores(exports: ChangeExports, timeline: Timeline, since: str, to: str | None,
                   base: str | None = None) -> bool:
    """Whether base's (default: since's) full copy plus the increment is ``to``."""
    onto = timeline.scratch / "restore.raw"
    shutil.copyfile(timeline.full[base or since], onto)
    await export(exports, timeline.volume_id, since, to, onto)
    expected = timeline.full[to or "now"]
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(onto),
                               str(expected)], capture_output=True, text=True)
    return compared.returncode == 0


def dirty_of(runs: list[Extent]) -> list[tuple[int, int]]:
    return merge([[r.start, r.length, int(r.dirty)] for r in runs])


def merge(ranges: list[list[int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length, flags in ranges:
        if not flags & 1:
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], start + length)
        else:
            out.append((start, start + length))
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_every_pair_restores_exactly(host: Host, tmp_path: Path, fmt: str) -> None:
    ops = host.ops
    exports = ChangeExports(ops, host.state_dir / "exports")
    meta = await ops.create_volume(size=SIZE, format=fmt)
    timeline = Timeline(ops, meta.id, tmp_path, seed=7 if fmt == "raw" else 11)
    for _ in range(4):
        timeline.scribble()
        await timeline.snapshot()
    timeline.scribble()
    timeline.copy_now("now")
    s = timeline.snapshots
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in ops.store.files_of(meta).existing() if p.name != f"volume-{meta.id}.meta"}
    for i, since in enumerate(s):
        for to in [*s[i + 1:], None]:
            assert await restores(exports, timeline, since, to), (since, to)
    # negative control: the increment S2 -> S3 on S1's full copy is not S3
    assert not await restores(exports, timeline, s[1], s[2], base=s[0])

    # the set libnbd reads from the bitmap is the one computed from the overlays' map
    result, seen, changed = await export(exports, meta.id, s[0], None, None)
    assert merge(seen["extents"]) == dirty_of(result.runs)
    assert changed == sum(r.length for r in result.runs if r.dirty) > 0
    assert seen["size"] == SIZE
    assert any(r.dirty and r.zero for r in result.runs)  # zeroed ranges are changes too

    # nothing left behind: no view, no server, the volume's files untouched (no bitmap)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in ops.store.files_of(meta).existing() if p.name != f"volume-{meta.id}.meta"}
    assert after == before
    assert list((host.state_dir / "exports").iterdir()) == []
    assert subprocess.run(["pgrep", "-f", "qemu-nbd -r -f qcow2 -B hostvold-changes"],
                          capture_output=True).returncode == 1


async def test_deletes_keep_pairs_exact_and_fall_back(host: Host, tmp_path: Path) -> None:
    ops = host.ops
    exports = ChangeExports(ops, host.state_dir / "exports")
    meta = await ops.create_volume(size=SIZE, format="raw")
    timeline = Timeline(ops, meta.id, tmp_path, seed=3)
    for _ in range(4):
        timeline.scribble()
        await timeline.snapshot()
    timeline.scribble()
    timeline.copy_now("now")
    s1, s2, s3, s4 = timeline.snapshots
    await ops.delete_snapshot(meta.id, s2)  # an intermediate one, offline (commit)
    assert await restores(exports, timeline, s1, s3)
    assert await restores(exports, timeline, s1, None)
    result, _, _ = await export(exports, meta.id, s2, s4, None)  # from the deleted one
    assert result.span.fallback and result.span.since == s1
    assert await restores(exports, timeline, s1, s4)
    await ops.delete_snapshot(meta.id, s4)  # the newest: its overlay is the active file
    assert await restores(exports, timeline, s3, None)
    await ops.delete_snapshot(meta.id, s1)  # nothing older survives it
    with pytest.raises(NotFound, match="full copy is needed"):
        await export(exports, meta.id, s1, None, None)
    result, _, _ = await export(exports, meta.id, s1, None, None, full_if_needed=True)
    assert result.span.full and all(r.dirty for r in result.runs)
    onto = tmp_path / "zero.raw"
    subprocess.run(["truncate", "-s", str(SIZE), str(onto)], check=True)
    await export(exports, meta.id, s1, None, onto, full_if_needed=True)
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(onto),
                           str(timeline.full["now"])]).returncode == 0

"""Shared helpers for the snapshot tests: real bytes written and read with qemu-io, and the
invariants every volume must satisfy (info file equals the chain, no orphan file)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hostvold.core.layout import VolumeFiles
from hostvold.ops.operations import Operations
from hostvold.storage.infofile import read_info

MiB = 1 << 20
REGION = 64 * 1024
SIZE = 16 * MiB


def pattern(generation: int) -> int:
    return 0x10 + generation


def qemu_io(path: Path, fmt: str, commands: list[str], read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt] + (["-r"] if read_only else [])
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=True)
    assert "failed" not in result.stdout.lower(), result.stdout
    return result.stdout


def write_generation(path: Path, fmt: str, generation: int) -> None:
    """Generation g writes its pattern over region 0 (shared by all) and region g (its own)."""
    qemu_io(path, fmt, [f"write -P {pattern(generation)} 0 {REGION}",
                        f"write -P {pattern(generation)} {generation * MiB} {REGION}"])


def expected_reads(generation: int, newest: int = 12) -> list[str]:
    """qemu-io reads that hold exactly after generation ``generation`` was written."""
    reads = [f"read -P {pattern(generation)} 0 {REGION}"]
    for g in range(1, newest + 1):
        value = pattern(g) if g <= generation else 0
        reads.append(f"read -P {value} {g * MiB} {REGION}")
    return reads


@dataclass
class Lab:
    """One volume whose snapshot k was taken right after generation k was written."""

    volumes: Operations
    snapshots: Operations
    volume_id: str
    generation_of: dict[str, int] = field(default_factory=dict)  # snapshot id -> generation
    current: int = 0

    @property
    def files(self) -> VolumeFiles:
        return self.volumes.store.files_of(self.volumes.store.get_volume(self.volume_id))

    def active(self) -> tuple[Path, str]:
        files = self.files
        active = read_info(files).active
        meta = self.volumes.store.get_volume(self.volume_id)
        return files.directory / active, meta.format if active == files.base_name else "qcow2"

    def write(self) -> None:
        self.current += 1
        path, fmt = self.active()
        write_generation(path, fmt, self.current)

    async def snapshot(self) -> str:
        snap = await self.snapshots.create_snapshot(self.volume_id)
        self.generation_of[snap.id] = self.current
        return snap.id

    def rebind(self, volumes: Operations, snapshots: Operations) -> None:
        """After a restart: the same volume through the new service objects."""
        self.volumes, self.snapshots = volumes, snapshots

    def check_data(self, alive: dict[str, int] | None = None,
                   active_generation: int | None = None) -> None:
        """Every snapshot reads its own point in time; the active file the newest data."""
        files = self.files
        chain_map = read_info(files)
        alive = self.generation_of if alive is None else alive
        assert set(chain_map.snapshots) == set(alive)
        for sid, generation in alive.items():
            data = backing_of(files, chain_map.snapshots[sid])
            fmt = self.volumes.store.get_volume(self.volume_id).format \
                if data == files.base_name else "qcow2"
            qemu_io(files.directory / data, fmt, expected_reads(generation), read_only=True)
        path, fmt = self.active()
        qemu_io(path, fmt, expected_reads(self.current if active_generation is None
                                          else active_generation), read_only=True)

    def check_consistent(self) -> None:
        check_consistent(self.volumes, self.volume_id)


def backing_of(files: VolumeFiles, name: str) -> str:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(files.directory / name)],
        capture_output=True, text=True, check=True).stdout)
    return str(info["backing-filename"])


def check_consistent(volumes: Operations, volume_id: str) -> None:
    """The info file equals the chain qemu-img reads; no file of the volume is an orphan;
    nothing is left in flight."""
    meta = volumes.store.get_volume(volume_id)
    files = volumes.store.files_of(meta)
    chain_map = read_info(files)
    fmt = meta.format if chain_map.active == files.base_name else "qcow2"
    layers = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", "--backing-chain",
         str(files.directory / chain_map.active)],
        capture_output=True, text=True, check=True).stdout)
    chain = [Path(layer["filename"]).name for layer in layers]
    assert chain[0] == chain_map.active and chain[-1] == files.base_name
    assert sorted(chain[:-1]) == sorted(chain_map.snapshots.values())
    on_disk = sorted(p.name for p in files.existing())
    expected = sorted([*chain, files.meta.name] + ([files.info.name] if files.info.exists()
                                                   else []))
    assert on_disk == expected, f"orphans: {set(on_disk) - set(expected)}"
    assert meta.operation is None and meta.state == "available" and not meta.problems
    assert meta.active == chain_map.active
    assert set(meta.snapshots) == set(chain_map.snapshots)


async def make_lab(volumes: Operations, snapshots: Operations, count: int,
                   fmt: str = "raw") -> Lab:
    meta = await volumes.create_volume(size=SIZE, format=fmt)
    lab = Lab(volumes, snapshots, meta.id)
    for _ in range(count):
        lab.write()
        await lab.snapshot()
    lab.write()
    return lab

"""A corpus of hostile images, each imported with and without a declared format, by path
(root's route) and by descriptor (everyone's route): every import is refused or taken
strictly as raw bytes, and no host file's content reaches any volume, clone, snapshot or
export."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hostvold.core.errors import HostvoldError
from hostvold.ops.operations import Operations
from tests.conftest import Host

pytestmark = pytest.mark.integration
MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


class Corpus:
    """Hostile images next to a host file holding a random marker (the secret)."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.marker = secrets.token_bytes(48)
        self.secret = root / "host-secret"
        self.images: dict[str, Path] = {}
        secret = str(self.secret)

        def qcow2(name: str, *options: str) -> Path:
            path = root / name
            qemu_img("create", "-q", "-f", "qcow2", *options, str(path), "1M")
            self.images[name.split(".")[0]] = path
            return path

        qcow2("backing-outside.qcow2", "-u", "-b", secret, "-F", "raw")
        qcow2("backing-json.qcow2", "-u", "-b", "json:" + json.dumps(
            {"driver": "raw", "file": {"driver": "file", "filename": secret}}), "-F", "raw")
        qcow2("backing-relative.qcow2", "-u", "-b", "host-secret", "-F", "raw")
        qcow2("backing-loop.qcow2", "-u", "-b", "backing-loop.qcow2", "-F", "qcow2")
        qcow2("external-data-file.qcow2", "-o", f"data_file={secret}")  # makes the secret
        huge = qcow2("huge-virtual-size.qcow2")
        with open(huge, "r+b") as image:  # a header claiming 1 EiB
            image.seek(24)
            image.write((1 << 60).to_bytes(8, "big"))
        vmdk = root / "vmdk-descriptor.vmdk"
        vmdk.write_text("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                        "createType=\"monolithicFlat\"\n\n# Extent description\n"
                        f"RW 2048 FLAT \"{secret}\" 0\n\n# The Disk Data Base\n#DDB\n")
        self.images["vmdk-descriptor"] = vmdk
        disguised = root / "raw-looking-like-qcow2.raw"
        disguised.write_bytes(self.images["backing-outside"].read_bytes().ljust(MiB, b"\0"))
        self.images["raw-looking-like-qcow2"] = disguised
        link = root / "symlink"
        link.symlink_to(self.secret)
        self.images["symlink"] = link
        self.images["device"] = Path("/dev/zero")
        fifo = root / "fifo"
        os.mkfifo(fifo)
        self.images["fifo"] = fifo
        self.images["directory"] = root
        self.secret.write_bytes(self.marker * (MiB // 48))  # last: the data file truncated it
        self.secret.chmod(0o600)

    def found_in(self, path: Path) -> bool:
        return self.marker[:24] in path.read_bytes()


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus(tmp_path / "corpus")


@pytest.fixture
async def host(host_factory: Callable[..., Host]) -> AsyncIterator[Host]:
    host = host_factory(512)
    await host.start()
    yield host
    host.stop()


@contextmanager
def opened(path: Path) -> Iterator[int | None]:
    """The image opened as a careful client would (no symbolic link followed; None when
    it cannot be opened at all)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def share_holds_marker(service: Operations, corpus: Corpus) -> list[str]:
    mount = service.store.shares[0].mount_point
    return [p.name for p in mount.iterdir() if p.is_file() and corpus.found_in(p)]


async def test_hostile_images_are_refused_or_taken_as_raw_bytes(
        host: Host, tmp_path: Path, corpus: Corpus) -> None:
    assert host.daemon is not None and host.daemon.ops is not None
    service, snapshots = host.daemon.ops, host.ops
    outcomes: dict[str, str] = {}
    for name, image in corpus.images.items():
        for declared in (None, "raw", "qcow2"):
            for route in ("path", "fd"):
                key = f"{name}/{declared or 'undeclared'}/{route}"
                options: dict[str, object] = {"format": "qcow2" if route == "fd" else "raw"}
                if declared:
                    options["source_format"] = declared
                try:
                    if route == "path":
                        meta = await service.import_volume(source=str(image), **options)
                    else:
                        with opened(image) as fd:
                            if fd is None:
                                outcomes[key] = "client cannot open"
                                continue
                            meta = await service.import_volume(fd=fd, **options)
                except HostvoldError as exc:
                    outcomes[key] = f"refused {exc.name}"
                    continue
                outcomes[key] = f"imported as {meta.format} from {declared or 'sniffed'}"
                # whatever was imported: its clone, a snapshot, an export hold no secret
                snap = await snapshots.create_snapshot(meta.id)
                clone = await snapshots.clone(meta.id)
                dest = tmp_path / f"export-{len(outcomes)}.raw"
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    await service.export_volume(meta.id, fd=fd, format="raw")
                finally:
                    os.close(fd)
                assert not corpus.found_in(dest), key
                from_snap = await snapshots.create_from_snapshot(meta.id, snap.id)
                assert {clone.id, from_snap.id} <= {m.id for m in service.store.list_volumes()}
                assert share_holds_marker(service, corpus) == [], key
    print("\n".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    refused_always = ["backing-outside", "backing-json", "backing-relative", "backing-loop",
                      "external-data-file", "huge-virtual-size"]
    for name in refused_always:  # refused unless declared raw (then: raw bytes)
        for route in ("path", "fd"):
            assert outcomes[f"{name}/undeclared/{route}"].startswith("refused"), name
            assert outcomes[f"{name}/qcow2/{route}"].startswith("refused"), name
            assert outcomes[f"{name}/raw/{route}"] == "imported as " + (
                "raw" if route == "path" else "qcow2") + " from raw", name
    for declared in ("undeclared", "raw"):  # never interpreted: the descriptor's bytes
        for route in ("path", "fd"):
            assert outcomes[f"vmdk-descriptor/{declared}/{route}"].startswith("imported")
    assert outcomes["vmdk-descriptor/qcow2/path"].startswith("refused")
    assert outcomes["raw-looking-like-qcow2/raw/fd"].startswith("imported")
    assert outcomes["raw-looking-like-qcow2/undeclared/fd"].startswith("refused")
    for name in ("symlink", "device", "fifo", "directory"):
        for declared in ("undeclared", "raw", "qcow2"):
            assert outcomes[f"{name}/{declared}/path"].startswith("refused"), name
            assert not outcomes[f"{name}/{declared}/fd"].startswith("imported"), name
    assert share_holds_marker(service, corpus) == []
    assert stat.S_IMODE(corpus.secret.stat().st_mode) == 0o600

"""Fixtures for tests with the real Linux guest (a pytest plugin, loaded by conftest).

The guest boots once per module: ``real_guest`` hands out the running one and boots a new
one when a test destroyed it. Its QEMU gets a mount namespace of its own when it starts,
so the shares of a module's tests are mounted under ``guest_mounts``, a shared mount made
before the boot (mounts made later under it reach QEMU's namespace too).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.guest.image import BuildFailed, GuestImage, ensure_image
from tests.guest.vm import RealGuest, boot
from tests.live_fixtures import destroy_by_name, shared_directory


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    try:
        return ensure_image()
    except BuildFailed as exc:
        need(False, f"the test guest image ({exc})")
        raise


@pytest.fixture(scope="module")
def guest_mounts() -> Iterator[Path]:
    with shared_directory("hostvold-guest-mnt-") as base:
        yield base


def mount_base_under_guest_mounts(guest_mounts: Path) -> Path:
    """A test's mount base, under the module's shared mount that the guests' QEMUs saw (a
    guest module's ``shared_base``: ``shared_base = pytest.fixture(name="shared_base")(
    mount_base_under_guest_mounts)``)."""
    base = guest_mounts / f"t{time.monotonic_ns()}"
    base.mkdir()
    base.chmod(0o755)
    return base


class GuestKeeper:
    """The module's guest: the same one while it runs, a new boot once it died."""

    def __init__(self, image: GuestImage, uri: str, directory: Path,
                 prefix: str = "hostvold-guest") -> None:
        self.image = image
        self.uri = uri
        self.directory = directory
        self.prefix = prefix  # a second keeper's guests need names of their own
        self.guest: RealGuest | None = None
        self.boots = 0

    def get(self) -> RealGuest:
        if self.guest is not None and self.guest.is_running():
            return self.guest
        self.close()
        self.boots += 1
        name = f"{self.prefix}-{os.getpid()}-{self.boots}"
        console = self.directory / f"{name}.console"
        started = time.monotonic()
        self.guest = boot(self.image, name, console, self.uri)
        print(f"\nguest {name} booted in {time.monotonic() - started:.1f} s")
        return self.guest

    def close(self) -> None:
        if self.guest is not None:
            destroy_by_name(self.uri, self.guest.name)
            self.guest = None


@pytest.fixture(scope="module")
def guest_keeper(libvirtd: str, guest_image: GuestImage,
                 guest_mounts: Path) -> Iterator[GuestKeeper]:
    consoles = guest_mounts / "consoles"
    consoles.mkdir()
    keeper = GuestKeeper(guest_image, libvirtd, consoles)
    yield keeper
    keeper.close()


@pytest.fixture
def real_guest(guest_keeper: GuestKeeper) -> RealGuest:
    return guest_keeper.get()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Room for copies of volumes (outside pytest's temp tree, on the host's disk)."""
    path = Path(tempfile.mkdtemp(prefix="hostvold-guest-scratch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


"""Fixtures for tests with a real TCG domain (a pytest plugin, loaded by conftest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from bench.live_rig import DOMAIN_XML  # one small TCG domain for tests and benchmarks
from tests.conftest import DaemonProcess, Host
from tests.test_dbus import Cli, with_bus


@contextlib.contextmanager
def shared_directory(prefix: str) -> Iterator[Path]:
    """A directory for mount points QEMU's user can reach (pytest's temp tree is 0700), on
    a shared mount: libvirt starts each QEMU in a mount namespace of its own, and only
    mounts under a shared mount reach it (on a systemd host "/" itself is shared)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-R", "-l", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    with shared_directory("hostvold-mnt-") as base:
        yield base


@pytest.fixture
def domain(libvirtd: str, shared_base: Path) -> Iterator[str]:
    """A running diskless TCG domain with a virtio-scsi controller (hot-plug needs no
    guest cooperation on SCSI), started after the mount base became shared."""
    conn = libvirt.open(libvirtd)
    name = f"hostvold-test-{os.getpid()}-{time.monotonic_ns() % 100000}"
    conn.createXML(DOMAIN_XML.format(name=name), 0)
    conn.close()
    yield name
    destroy_by_name(libvirtd, name)


def destroy_by_name(uri: str, name: str) -> None:
    """The domain called ``name`` is gone when this returns: looked up on a connection of
    its own (a test may have restarted libvirtd, which closes older connections, or
    started the domain again under the same name)."""
    conn = libvirt.open(uri)
    try:
        for _ in range(10):  # libvirt refuses while a job of the domain still winds down
            try:
                conn.lookupByName(name).destroy()
                return
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return  # gone already (the test destroyed it itself)
                try:
                    if not conn.lookupByName(name).isActive():
                        return
                except libvirt.libvirtError:
                    return
            time.sleep(1)
        raise RuntimeError(f"test domain {name} could not be destroyed")
    finally:
        conn.close()


@pytest.fixture
def live(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
         daemon_factory: Callable[..., DaemonProcess], shared_base: Path,
         libvirtd: str) -> Callable[..., tuple[Cli, DaemonProcess, Host]]:
    def start(extra: str = "") -> tuple[Cli, DaemonProcess, Host]:
        address = bus_factory("hostvold")
        host = host_factory(512, extra=extra, mount_point_base=shared_base / str(
            time.monotonic_ns()))
        process = daemon_factory(with_bus(host, address))
        return Cli(address), process, host
    return start



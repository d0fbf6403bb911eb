"""The test guest's kernel and initramfs, built from Debian's own packages (SPEC section 16).

    python -m tests.guest.image [--cache DIR]     build (or find) it, print the two paths

Nothing is installed on the host: each package is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` into a scratch tree. From it come the kernel (the ELF
``vmlinux`` taken out of ``vmlinuz``: it boots directly, without the 8 s decompression under
TCG), the modules the disks and ext4 need (with their own dependencies, read from each
``.ko``), busybox, e2fsprogs, ``qemu-ga`` and the libraries they link. ``guestio`` (the
writer and the latency probe) is compiled here, static. The result is cached under a key of
every input (this file, the guest's scripts, the package versions), so a second run costs
one ``apt-cache`` call.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("HOSTVOLD_GUEST_CACHE", "/var/cache/hostvold-test-guest"))
KERNEL_PACKAGE = "linux-image-amd64"  # a metapackage: the versioned image it depends on
PACKAGES = ("busybox-static", "qemu-guest-agent", "e2fsprogs", "libc6", "libglib2.0-0",
            "libpcre2-8-0", "libnuma1", "libudev1", "liburing2", "libext2fs2", "libcom-err2",
            "libblkid1", "libuuid1", "libss2", "libffi8", "libmount1", "libselinux1", "zlib1g")
PROGRAMS = ("usr/sbin/qemu-ga", "sbin/mke2fs", "sbin/e2fsck", "sbin/resize2fs", "sbin/dumpe2fs")
# ext4 only soft-depends on crc32c: named here, like every driver the guest's disks need
MODULES = ("crc32c_generic", "crct10dif_generic", "virtio_pci", "virtio_blk", "virtio_scsi",
           "sd_mod", "virtio_console", "ext4")
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


class BuildFailed(Exception):
    """The guest could not be built on this host (a package, a compiler, a step)."""


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildFailed(f"{' '.join(argv[:3])}: {result.stderr.strip()[-800:]}")
    return result.stdout


def kernel_package() -> str:
    for line in apt("depends", KERNEL_PACKAGE).splitlines():
        found = re.match(r"\s*Depends: (linux-image-\S+)", line)
        if found:
            return found.group(1)
    raise BuildFailed(f"{KERNEL_PACKAGE} names no kernel image")


def apt(command: str, *names: str) -> str:
    """apt-cache, after one ``apt-get update`` when the lists are missing or stale."""
    try:
        return run("apt-cache", command, *names)
    except BuildFailed:
        run("apt-get", "update", "-qq")
        return run("apt-cache", command, *names)


def versions(names: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    current = ""
    for line in apt("policy", *names).splitlines():
        if line and not line.startswith(" "):
            current = line.rstrip(":")
        elif line.strip().startswith("Candidate:"):
            found[current] = line.split(":", 1)[1].strip()
    missing = [name for name in names if found.get(name, "(none)") == "(none)"]
    if missing:
        raise BuildFailed(f"no Debian package candidate for {', '.join(missing)}")
    return found


def cache_key(packages: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(packages):
        digest.update(f"{name}={packages[name]}\n".encode())
    for source in ("image.py", "init", "guestctl", "guestio.c"):
        digest.update((HERE / source).read_bytes())
    return digest.hexdigest()[:16]


def ensure_image(cache: Path = CACHE) -> GuestImage:
    """The kernel and initramfs for the current inputs, built once and kept."""
    names = [kernel_package(), *PACKAGES]
    target = cache / cache_key(versions(names))
    image = GuestImage(target / "vmlinux", target / "initrd.gz")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)  # QEMU's user reads kernel and initrd through it
    with tempfile.TemporaryDirectory(prefix="hostvold-guest-") as scratch:
        work = Path(scratch)
        build(names, work)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        shutil.move(str(work / "vmlinux"), staging / "vmlinux")
        shutil.move(str(work / "initrd.gz"), staging / "initrd.gz")
        staging.chmod(0o755)
        for built in staging.iterdir():
            built.chmod(0o644)
        try:
            staging.rename(target)  # whole or not at all: a second builder's result wins
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return image


def build(names: list[str], work: Path) -> None:
    debs, tree = work / "debs", work / "tree"
    debs.mkdir()
    tree.mkdir()
    download = ("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names)
    try:
        run(*download, cwd=debs)
    except BuildFailed:  # lists older than the mirror: the versions named are gone
        run("apt-get", "update", "-qq")
        run(*download, cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        run("dpkg-deb", "-x", str(deb), str(tree))
    release = next((tree / "lib/modules").iterdir()).name
    (work / "vmlinux").write_bytes(extract_vmlinux((tree / "boot" / f"vmlinuz-{release}")
                                                   .read_bytes()))
    run("gcc", "-static", "-O2", "-o", str(work / "guestio"), str(HERE / "guestio.c"))
    files = initramfs_files(tree, release, work / "guestio")
    for program in PROGRAMS:  # every library resolves: each program starts in the tree
        check_runs(tree, program)
    (work / "initrd.gz").write_bytes(gzip.compress(cpio(files), compresslevel=1))


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage compressed with xz (Debian's choice)."""
    start = vmlinuz.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            kernel = lzma.LZMADecompressor().decompress(vmlinuz[start:])
        except lzma.LZMAError:
            kernel = b""
        if kernel.startswith(b"\x7fELF"):
            return kernel
        start = vmlinuz.find(b"\xfd7zXZ\x00", start + 1)
    raise BuildFailed("no xz-compressed ELF kernel found in vmlinuz")


def module_paths(tree: Path, release: str) -> dict[str, Path]:
    paths = {}
    for path in (tree / "lib/modules" / release / "kernel").rglob("*.ko"):
        paths[path.stem.replace("-", "_")] = path
    return paths


def depends(module: Path) -> list[str]:
    found = re.search(rb"\x00depends=([^\x00]*)\x00", module.read_bytes())
    if not found or not found.group(1):
        return []
    return [name.decode().replace("-", "_") for name in found.group(1).split(b",")]


def load_order(paths: dict[str, Path]) -> list[str]:
    """Every module named, after the ones it depends on."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in paths:
            raise BuildFailed(f"kernel module {name} not in the kernel package")
        for dependency in depends(paths[name]):
            visit(dependency)
        order.append(name)

    for name in MODULES:
        visit(name)
    return order


def initramfs_files(tree: Path, release: str, guestio: Path) -> dict[str, bytes | str]:
    """Archive path -> contents (bytes: a file; str: a symlink's target)."""
    files: dict[str, bytes | str] = {
        "init": (HERE / "init").read_bytes(),
        "bin/guestctl": (HERE / "guestctl").read_bytes(),
        "bin/guestio": guestio.read_bytes(),
        "bin/busybox": (tree / "bin/busybox").read_bytes(),
        "lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "etc/mke2fs.conf": (tree / "etc/mke2fs.conf").read_bytes(),
    }
    for program in PROGRAMS:
        files[program] = (tree / program).read_bytes()
    for directory in LIBRARY_DIRS:
        for path in (tree / directory).iterdir():
            if ".so" not in path.name or path.is_dir():
                continue
            name = f"lib/x86_64-linux-gnu/{path.name}"  # one directory: the loader's default
            files[name] = os.readlink(path) if path.is_symlink() else path.read_bytes()
    paths = module_paths(tree, release)
    order = load_order(paths)
    for name in order:
        files[f"lib/modules/{name}.ko"] = paths[name].read_bytes()
    files["lib/modules/order"] = ("\n".join(order) + "\n").encode()
    return files


def check_runs(tree: Path, program: str) -> None:
    """The program starts inside the unpacked tree (its libraries all found)."""
    argv = ["chroot", str(tree), f"/{program}", "-V"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if "error while loading shared libraries" in result.stderr or result.returncode == 127:
        raise BuildFailed(f"{program} does not start: {result.stderr.strip()}")


def cpio(files: dict[str, bytes | str]) -> bytes:
    """A newc archive (what the kernel unpacks as its initramfs), directories implied."""
    out = io.BytesIO()
    directories = sorted({str(Path(name).parents[i]) for name in files
                          for i in range(len(Path(name).parents) - 1)})
    inode = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal inode
        encoded = name.encode() + b"\x00"
        header = "070701" + "".join(f"{value:08x}" for value in (
            inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b"\x00" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))
        inode += 1

    for directory in ["dev", "proc", "sys", *directories]:
        entry(directory, stat.S_IFDIR | 0o755, b"")
    for name, content in sorted(files.items()):
        if isinstance(content, str):
            entry(name, stat.S_IFLNK | 0o777, content.encode())
        else:
            data = name.startswith(("etc/", "lib/modules/"))  # programs, the loader, libraries
            entry(name, stat.S_IFREG | (0o644 if data else 0o755), content)
    entry("TRAILER!!!", 0, b"")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    image = ensure_image(parser.parse_args().cache)
    print(image.kernel)
    print(image.initrd)


if __name__ == "__main__":
    main()

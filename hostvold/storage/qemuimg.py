"""The qemu-img edge: one async function per subcommand, one runner under them all.

Rules kept here so no caller has to remember them:
- argv only, never a shell; ``LC_ALL=C`` so messages are stable;
- the format is always given (``-f``) for images whose format we know: qemu-img never
  probes an image a guest could have written;
- every subcommand that reads such an image (info, measure, check, convert, commit,
  rebase, resize) runs under ``prlimit`` CPU and address-space limits (``[limits]``);
- an image a caller handed over as a file descriptor is reached as ``/dev/fd/N`` of the
  child (``pass_fds``), never by a path the caller named;
- on timeout or cancellation the child is killed and reaped;
- with many hosts, every child is held to this host's lease (:mod:`children`);
- a failure raises :class:`QemuImgError` carrying stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hostvold.core import progress
from hostvold.core.errors import Failed, NoSpace, QemuImgError, StorageUnavailable
from hostvold.core.images import Format
from hostvold.storage import children

ProgressCallback = Callable[[float], None]

QEMU_IMG = "qemu-img"
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class Limits:
    """Resource limits for qemu-img processes that read untrusted images."""

    cpu_seconds: int = 30
    address_space: int = 1 << 30

    def prefix(self) -> list[str]:
        return ["prlimit", f"--cpu={self.cpu_seconds}", f"--as={self.address_space}", "--"]


class ImageInfo(BaseModel):
    """One layer of ``qemu-img info --output=json``; only the fields hostvold uses."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    filename: str
    format: str
    virtual_size: int = Field(alias="virtual-size")
    actual_size: int = Field(default=0, alias="actual-size")
    backing_filename: str | None = Field(default=None, alias="backing-filename")
    backing_filename_format: str | None = Field(default=None, alias="backing-filename-format")
    full_backing_filename: str | None = Field(default=None, alias="full-backing-filename")
    format_specific: dict[str, object] | None = Field(default=None, alias="format-specific")


class Measure(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    required: int
    fully_allocated: int = Field(alias="fully-allocated")


# what qemu-img's stderr says when the share under it went away (NFS, FUSE)
STORAGE_LOST = ("Input/output error", "Stale file handle", "Transport endpoint is not connected")


async def run(argv: list[str], *, timeout: float | None = None,
              on_progress: ProgressCallback | None = None,
              context: str = "", ok_codes: tuple[int, ...] = (0,),
              pass_fds: tuple[int, ...] = ()) -> bytes:
    """Run ``argv`` and return its stdout; raise QemuImgError on any failure."""
    # every thread of qemu-img's pool would reserve a 64 MiB malloc arena: under the
    # address-space limit a commit or convert moving data then fails to start threads
    env = dict(os.environ, LC_ALL="C", MALLOC_ARENA_MAX="2")
    fenced = children.spawn_options()  # held to this host's lease (many hosts)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, pass_fds=pass_fds, **fenced)
    except PermissionError as exc:  # the guard's group went with it just now
        if not fenced:
            raise
        raise children.guard_refused("the fence guard just ended") from exc
    children.started(proc.pid, argv)
    try:
        async with asyncio.timeout(timeout):
            if on_progress is None:
                out, err = await proc.communicate()
            else:
                out, err = await _communicate_with_progress(proc, on_progress)
    except BaseException:  # timeout, cancellation: never leave a child behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        children.ended(proc.pid, argv, proc.returncode)
    if proc.returncode not in ok_codes:
        stderr = err.decode(errors="replace")
        failed = QemuImgError(argv, proc.returncode, stderr, context)
        if "No space left on device" in stderr or "Disk quota exceeded" in stderr:
            raise NoSpace(f"{failed.message}: the share is full; the operation stays "
                          "recorded and a retry finishes it once space is freed")
        if any(sign in stderr for sign in STORAGE_LOST):
            raise StorageUnavailable(f"{failed.message}: the storage failed under it")
        raise failed
    return out


async def _communicate_with_progress(proc: asyncio.subprocess.Process,
                                     on_progress: ProgressCallback) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read())
    out = bytearray()
    while chunk := await proc.stdout.read(4096):
        out += chunk
        # qemu-img -p redraws "    (42.00/100%)\r"; report the newest figure of this chunk
        found = _PROGRESS.findall(chunk)
        if found:
            on_progress(float(found[-1]) / 100.0)
    err = await stderr_task
    await proc.wait()
    return bytes(out), err


def _parse(model: type[BaseModel], data: bytes, argv: list[str]) -> object:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise Failed(f"unexpected output from {' '.join(argv[:2])}: {exc.errors()[0]['msg']}") \
            from None


async def info(path: Path, fmt: Format, limits: Limits) -> ImageInfo:
    """Info of one image, format pinned, under limits."""
    argv = [QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)]
    out = await run(limits.prefix() + argv, timeout=limits.cpu_seconds * 2,
                    context=_limits_text(limits))
    result = _parse(ImageInfo, out, argv)
    assert isinstance(result, ImageInfo)
    return result


def _limits_text(limits: Limits) -> str:
    return (f"qemu-img ran under limits cpu={limits.cpu_seconds}s "
            f"address-space={limits.address_space} bytes")


def fd_path(fd: int) -> Path:
    """How a child given ``fd`` (``pass_fds``) names that open file."""
    return Path(f"/dev/fd/{fd}")


async def create(path: Path, fmt: Format, size: int, *, backing: str | None = None,
                 backing_fmt: Format | None = None, preallocation: str | None = None) -> None:
    """Create an image. An overlay is made with ``-u``: the chain below is not opened."""
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        if backing_fmt is None:
            raise ValueError("an overlay needs an explicit backing format")
        argv += ["-u", "-b", backing, "-F", backing_fmt]
    if preallocation is not None:
        argv += ["-o", f"preallocation={preallocation}"]
    argv += [str(path), str(size)]
    await run(argv)


async def resize(path: Path, fmt: Format, size: int, *, limits: Limits,
                 preallocation: str | None = None) -> None:
    argv = [QEMU_IMG, "resize", "-q", "-f", fmt]
    if preallocation is not None:
        argv.append(f"--preallocation={preallocation}")
    await run([*limits.prefix(), *argv, str(path), str(size)], context=_limits_text(limits))


async def convert(src: Path, src_fmt: Format, dst: Path, dst_fmt: Format, *, limits: Limits,
                  sparse: bool = True, on_progress: ProgressCallback | None = None,
                  dst_options: str | None = None, pass_fds: tuple[int, ...] = (),
                  src_cache: str = "none", dst_cache: str = "none") -> None:
    """Copy ``src`` (and its chain) into a new standalone ``dst``, under ``limits``.

    Copy offloading (``-C``: copy_file_range) lets the filesystem share extents (XFS with
    reflink, btrfs) or copy server-side (NFS 4.2) instead of moving every byte through this
    host; qemu-img falls back to reading and writing by itself where the filesystem cannot.
    A caller's file (``/dev/fd/N`` with ``pass_fds``) is opened with the default cache: it
    may sit on a filesystem without O_DIRECT (tmpfs)."""
    on_progress = on_progress or progress.current.get()
    argv = [QEMU_IMG, "convert", "-C", "-f", src_fmt, "-O", dst_fmt, "-t", dst_cache,
            "-T", src_cache]
    if on_progress is not None:
        argv.append("-p")
    if not sparse:
        argv += ["-S", "0"]
    if dst_options:
        argv += ["-o", dst_options]
    await run([*limits.prefix(), *argv, str(src), str(dst)], on_progress=on_progress,
              context=_limits_text(limits), pass_fds=pass_fds)


def write_cache(path: Path, fmt: Format) -> str:
    """The cache mode qemu-img writes ``path`` with: ``none`` (O_DIRECT, past the page
    cache), but for a raw file whose size is not a multiple of 4 KiB (a small volume):
    qemu-img cannot open that for writing with O_DIRECT without the right to resize it
    ("Image size is not a multiple of request alignment"), so it is written through the
    page cache, which qemu-img flushes before it exits. Stats the file: off the loop."""
    return "writeback" if fmt == "raw" and path.stat().st_size % 4096 else "none"


async def commit(path: Path, fmt: Format, *, limits: Limits, drop: bool = True,
                 on_progress: ProgressCallback | None = None, cache: str = "none") -> None:
    """Merge ``path`` into its backing file; with ``drop`` the top is left as it was."""
    on_progress = on_progress or progress.current.get()
    argv = [QEMU_IMG, "commit", "-f", fmt, "-t", cache]
    if drop:
        argv.append("-d")
    if on_progress is not None:
        argv.append("-p")
    await run([*limits.prefix(), *argv, str(path)], on_progress=on_progress,
              context=_limits_text(limits))


async def commit_pair(top: Path, base: Path, base_fmt: Format, *, limits: Limits,
                      on_progress: ProgressCallback | None = None,
                      cache: str = "none") -> None:
    """Merge the qcow2 ``top`` into ``base`` opening those two files only.

    The node graph is spelled out (formats pinned, ``base``'s own backing cut), so the cost
    does not grow with the layers below, and qemu-img never follows a name from a header.
    Only for layers whose clusters line up (:func:`pair_commit_safe`): with the backing
    cut, a partial-cluster write into ``base`` would copy zeros instead of older data."""
    on_progress = on_progress or progress.current.get()
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(top)},
            "backing": {"driver": base_fmt, "file": {"driver": "file", "filename": str(base)},
                        **({"backing": None} if base_fmt == "qcow2" else {})}}
    argv = [QEMU_IMG, "commit", "-t", cache, "-d"]
    if on_progress is not None:
        argv.append("-p")
    await run([*limits.prefix(), *argv, "json:" + json.dumps(spec)],
              on_progress=on_progress, context=_limits_text(limits))


async def rebase_unsafe(path: Path, fmt: Format, backing: str, backing_fmt: Format, *,
                        limits: Limits) -> None:
    """Rewrite the backing reference of ``path`` only (no data is copied)."""
    await run([*limits.prefix(), QEMU_IMG, "rebase", "-u", "-f", fmt, "-b", backing, "-F",
               backing_fmt, str(path)], context=_limits_text(limits))


async def measure(src: Path, src_fmt: Format, out_fmt: Format, limits: Limits,
                  pass_fds: tuple[int, ...] = ()) -> Measure:
    """Bytes a conversion of ``src`` into ``out_fmt`` needs; ``src`` may be untrusted."""
    argv = [QEMU_IMG, "measure", "-f", src_fmt, "-O", out_fmt, "--output=json", str(src)]
    out = await run(limits.prefix() + argv, timeout=limits.cpu_seconds * 2,
                    context=_limits_text(limits), pass_fds=pass_fds)
    result = _parse(Measure, out, argv)
    assert isinstance(result, Measure)
    return result


async def compare(first: Path, first_fmt: Format, second: Path, second_fmt: Format,
                  limits: Limits) -> str | None:
    """None when the two images (each with its chain) read the same, else qemu-img's
    description of the first difference. Read-only and shared with a running QEMU."""
    argv = [QEMU_IMG, "compare", "-U", "-f", first_fmt, "-F", second_fmt, str(first),
            str(second)]
    out = await run(limits.prefix() + argv, ok_codes=(0, 1), context=_limits_text(limits))
    text = out.decode(errors="replace").strip()
    return None if text.startswith("Images are identical") else text


async def own_extents(path: Path, fmt: Format, limits: Limits) -> list[tuple[int, int]]:
    """(offset, length) of the data ``path`` itself holds, not its backing files."""
    argv = [QEMU_IMG, "map", "-U", "-f", fmt, "--output=json", str(path)]
    out = await run(limits.prefix() + argv, context=_limits_text(limits))
    try:
        return [(int(e["start"]), int(e["length"])) for e in json.loads(out)
                if e.get("depth") == 0 and e.get("data")]
    except (ValueError, KeyError, TypeError) as exc:
        raise Failed(f"unexpected output from qemu-img map: {exc}") from None

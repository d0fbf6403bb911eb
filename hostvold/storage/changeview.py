"""A read-only NBD export of one point in time of a volume, with its changed extents as the
dirty bitmap ``qemu:dirty-bitmap:hostvold-changes`` (SPEC section 5b).

Built with qemu's own tools in a private directory of the daemon, never in the volume's:
- a scratch qcow2 with an enabled bitmap, whose bits are set by zero-writes of the changed
  extents (metadata only; one ``qemu-io`` for all of them);
- a view: an empty qcow2 on the point in time's top layer, given that bitmap, disabled
  (``qemu-img bitmap --merge``); the volume's own files never get a bitmap.

``qemu-nbd`` serves the view to one client: it is handed a listening socket (socket
activation) in that private directory, hostvold connects to it and removes its name at
once, so the connected end, passed to the caller, is the only way in. qemu-nbd ends when
that client leaves, dies with the daemon (parent-death signal), and runs read-only with no
capability but reading files (``CAP_DAC_READ_SEARCH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from hostvold.core.changes import Extent
from hostvold.core.errors import Failed
from hostvold.core.images import Format
from hostvold.storage.qemuimg import QEMU_IMG, Limits, run

BITMAP = "hostvold-changes"
CONTEXT = f"qemu:dirty-bitmap:{BITMAP}"
# the NBD server's rights: read-only, no capability but reading any file, no new privileges,
# killed when the daemon dies
CONFINED = ["setpriv", "--pdeathsig", "KILL", "--no-new-privs",
            "--bounding-set", "-all,+dac_read_search"]


async def map_entries(top: Path, fmt: Format, limits: Limits) -> list[dict[str, Any]]:
    """``qemu-img map`` of the point in time's top layer (at rest: no ``-U``)."""
    argv = [QEMU_IMG, "map", "-f", fmt, "--output=json", str(top)]
    out = await run(limits.prefix() + argv)
    try:
        entries = json.loads(out)
        assert isinstance(entries, list)
        return entries
    except (ValueError, AssertionError) as exc:
        raise Failed(f"unexpected output from qemu-img map of {top.name}: {exc}") from None


async def prepare(workdir: Path, top: Path, fmt: Format, size: int) -> None:
    """The scratch file with its enabled bitmap and the view with its disabled one, made
    side by side (and beside the map of the changes, which they do not need)."""
    scratch, view = workdir / "changes.qcow2", workdir / "view.qcow2"

    async def make_scratch() -> None:
        await run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(scratch), str(size)])
        await run([QEMU_IMG, "bitmap", "--add", str(scratch), BITMAP])

    async def make_view() -> None:
        await run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", str(top), "-F", fmt,
                   str(view), str(size)])
        await run([QEMU_IMG, "bitmap", "--add", "--disable", str(view), BITMAP])

    await asyncio.gather(make_scratch(), make_view())


async def mark(workdir: Path, runs: list[Extent]) -> Path:
    """The view (of :func:`prepare`) given the bitmap of ``runs``' dirty extents."""
    scratch, view = workdir / "changes.qcow2", workdir / "view.qcow2"
    script = "".join(f"write -z {r.start} {r.length}\n" for r in runs if r.dirty)
    if script:
        await _qemu_io(scratch, script)
        await run([QEMU_IMG, "bitmap", "--merge", BITMAP, "-b", str(scratch), "-F", "qcow2",
                   str(view), BITMAP])
    scratch.unlink()
    return view


async def _qemu_io(image: Path, script: str) -> None:
    """One qemu-io for every command of ``script`` (read from its standard input); no
    flushes: the scratch file is merged into the view and removed straight after."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-t", "unsafe", "-f", "qcow2", str(image), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0 or err.strip():
        raise Failed(f"qemu-io failed marking the changed extents: "
                     f"{err.decode(errors='replace').strip()[-300:]}")


async def serve(view: Path, workdir: Path) -> tuple[int, asyncio.subprocess.Process]:
    """``qemu-nbd`` on ``view`` for one client; the client's connected socket (for the
    caller) and the server process (it ends when that client leaves; its complaints are
    on its standard error, see :func:`ended`)."""
    directory = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    path = f"/proc/self/fd/{directory}/nbd.sock"  # short, however deep the directory
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        fd = listener.fileno()
        proc = await asyncio.create_subprocess_exec(
            *CONFINED, "bash", "-c",
            f'LISTEN_PID=$$ LISTEN_FDS=1 exec qemu-nbd -r -f qcow2 -B {BITMAP} '
            f'"$0" 3<&{fd}', str(view),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, pass_fds=(fd,))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(path)
        except OSError:
            client.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("nbd.sock", dir_fd=directory)  # nobody else can connect from now on
        os.close(directory)
        listener.close()
    return client.detach(), proc


async def ended(server: asyncio.subprocess.Process) -> str:
    """Wait for the server to end; what it said, if it failed."""
    assert server.stderr is not None
    said = await server.stderr.read()
    await server.wait()
    return said.decode(errors="replace").strip() if server.returncode else ""


def private_dir(root: Path, name: str) -> Path:
    """A new directory only the daemon can enter, for one export."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir = root / name
    workdir.mkdir(mode=0o700)
    return workdir


def remove_leftovers(root: Path) -> None:
    """At start: the views of exports a previous run did not end (their servers died
    with it)."""
    if root.is_dir():
        for child in root.iterdir():
            shutil.rmtree(child, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(child)

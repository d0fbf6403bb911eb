"""Where QEMU can reach the volumes: the preconditions of attaching, checked at start.

QEMU runs as its own user (``libvirt-qemu`` on Debian) in a mount namespace of its own that
libvirt makes for each domain. So every directory above a volume must let other users pass
(``o+x``), and the mount base must be a shared mount: a share mounted after the domain
started reaches the domain's namespace only by mount propagation (on a systemd host "/"
is shared; without systemd it often is not).
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def closed_ancestor(path: Path) -> Path | None:
    """The first directory from "/" down to ``path`` that other users cannot pass."""
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            mode = os.stat(current).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return current
    return None


def _mount_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[str, str]:
    """(mount point, optional fields) of the mount that holds ``path``."""
    best = ("/", "")
    target = str(path.resolve())
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        optional = " ".join(fields[6:fields.index("-")])
        if (target == point or target.startswith(point.rstrip("/") + "/")) \
                and len(point) >= len(best[0]):
            best = (point, optional)
    return best


def ensure_shared_mount(base: Path) -> str | None:
    """Make ``base`` a shared mount when it is not under one; what was done, or None."""
    point, optional = _mount_of(base)
    if "shared:" in optional:
        return None
    if point != str(base.resolve()):
        # not a mount point itself: bind it onto itself, recursively, so shares already
        # mounted inside (by an earlier start) stay in sight rather than hidden under it
        subprocess.run(["mount", "--rbind", str(base), str(base)], check=True,
                       capture_output=True, timeout=30)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True, capture_output=True,
                   timeout=30)
    return f"made {base} a shared mount (shares mounted later reach running domains)"


def qemu_preconditions(base: Path, local_share: Path | None) -> list[str]:
    """One sentence per precondition of attaching that does not hold, after fixing what
    the daemon may fix itself (the shared mount)."""
    problems = []
    for where in (base, local_share):
        if where is None:
            continue
        closed = closed_ancestor(where)
        if closed is not None:
            problems.append(f"QEMU's user cannot reach {where}: {closed} is not passable by "
                            f"other users (chmod o+x {closed}); attaching volumes there fails")
    try:
        done = ensure_shared_mount(base)
        if done:
            log.info("%s", done)
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"{base} is not a shared mount and could not be made one ({exc}); "
                        "shares mounted after a domain started are invisible to it")
    return problems

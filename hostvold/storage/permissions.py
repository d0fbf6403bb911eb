"""File modes for volume files: Cinder's ``nas_secure_file_permissions`` rule.

``true``  -> 0660; ``false`` -> 0666 (with a warning); ``auto`` -> true when the marker file
``.cinderSecureEnvIndicator`` is on the first share, or on a new install (no volumes yet),
in which case the marker is written so the choice sticks; false otherwise.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from hostvold.storage.atomic import write_atomic

log = logging.getLogger(__name__)

MARKER = ".cinderSecureEnvIndicator"
SECURE_MODE = 0o660
OPEN_MODE = 0o666


def resolve_secure(setting: str, first_share: Path | None, new_install: bool) -> bool:
    if setting in ("true", "false"):
        return setting == "true"
    if first_share is None:
        return False
    marker = first_share / MARKER
    if marker.exists():
        return True
    if not new_install:
        return False
    try:
        write_atomic(marker, b"", 0o640)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise
    return True


def file_mode(secure: bool) -> int:
    if not secure:
        log.warning("nas_secure_file_permissions resolved to false: volume files are created "
                    "with mode 0666 (readable and writable by every local user)")
    return SECURE_MODE if secure else OPEN_MODE

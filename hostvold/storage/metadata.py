"""hostvold's per-volume metadata file: the share alone describes its volumes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from hostvold.core.errors import Failed, HostvoldError
from hostvold.core.records import VolumeMeta
from hostvold.storage.atomic import write_atomic
from hostvold.storage.mounts import Share
from hostvold.storage.safefile import read_regular
from hostvold.storage.stamped import StampedCache

log = logging.getLogger(__name__)


_PARSED: StampedCache[VolumeMeta] = StampedCache(min_size=4096)  # deep chains only


def read_meta(path: Path) -> VolumeMeta:
    """The metadata file: a regular file, never followed through a symbolic link (UnsafeFile).
    It sits on shared storage: callers check the file names it records (see
    :func:`hostvold.core.layout.record_problems`) before acting on them."""
    def parse() -> VolumeMeta:
        try:
            return VolumeMeta.model_validate_json(read_regular(path))
        except ValidationError as exc:
            raise Failed(f"metadata file {path} is invalid: {exc.errors()[0]['msg']}") from None

    return _PARSED.get(path, parse)


def write_meta(path: Path, meta: VolumeMeta, mode: int,
               before_rename: Callable[[], None] | None = None) -> str:
    """Returns the JSON written, so that the index can store it as it is (a record with
    hundreds of snapshots is not serialised twice)."""
    # one line, in pydantic's own encoder: a record with hundreds of snapshots is written
    # at every step (json.dumps with sorted keys takes four times as long)
    text = meta.model_dump_json()
    _PARSED.remember(path, write_atomic(path, f"{text}\n".encode(), mode, before_rename),
                     meta)
    return text


def read_record(share: Share, path: Path, volume_id: str) -> VolumeMeta | None:
    """A metadata file as it is on the share, or None (logged) when it is unusable."""
    try:
        meta = read_meta(path)
    except (HostvoldError, OSError) as exc:
        log.error("skipping unreadable metadata %s: %s", path, exc)
        return None
    if meta.id != volume_id:
        log.error("skipping %s: it describes volume %s", path, meta.id)
        return None
    return meta.evolve(share=share.spec.address) if meta.share != share.spec.address \
        else meta

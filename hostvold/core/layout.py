"""Names of a volume's files on its share (Cinder's layout plus hostvold's metadata file).

``volume-<id>``              base file
``volume-<id>.<snap-id>``    overlay made when snapshot <snap-id> was taken
``volume-<id>.info``         Cinder's chain map (JSON)
``volume-<id>.meta``         hostvold's own metadata (JSON)
``.volume-<id>….tmp``        an atomic write in progress (removed at recovery)
"""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass(frozen=True)
class Naming:
    """Turns ids into file names and back, for one ``volume_name_template``."""

    template: str = "volume-%s"

    def base_name(self, volume_id: str) -> str:
        return self.template % volume_id

    def volume_id_of_meta(self, name: str) -> str | None:
        """The volume id if ``name`` is a metadata file name, else None."""
        prefix, suffix = self.template.split("%s")
        match = re.fullmatch(re.escape(prefix) + f"({_UUID})" + re.escape(suffix) + r"\.meta",
                             name)
        return match.group(1) if match else None

    def volume_id_of_base(self, name: str) -> str | None:
        prefix, suffix = self.template.split("%s")
        match = re.fullmatch(re.escape(prefix) + f"({_UUID})" + re.escape(suffix), name)
        return match.group(1) if match else None

    def volume_id_of_image(self, name: str) -> str | None:
        """The volume id if ``name`` is a base file or an overlay, else None."""
        prefix, suffix = self.template.split("%s")
        match = re.fullmatch(re.escape(prefix) + f"({_UUID})" + re.escape(suffix)
                             + rf"(?:\.{_UUID})?", name)
        return match.group(1) if match else None


@dataclass(frozen=True)
class VolumeFiles:
    """The files of one volume in one directory."""

    directory: Path
    base_name: str

    @classmethod
    def of(cls, directory: Path, naming: Naming, volume_id: str) -> VolumeFiles:
        return cls(directory, naming.base_name(volume_id))

    @property
    def base(self) -> Path:
        return self.directory / self.base_name

    @property
    def info(self) -> Path:
        return self.directory / f"{self.base_name}.info"

    @property
    def meta(self) -> Path:
        return self.directory / f"{self.base_name}.meta"

    def overlay_name(self, snapshot_id: str) -> str:
        return f"{self.base_name}.{snapshot_id}"

    def is_image(self, name: str) -> bool:
        """True for the base file and the volume's overlays: the files a chain may use."""
        return name == self.base_name or _overlay_pattern(self.base_name).fullmatch(
            name) is not None

    def owns(self, name: str) -> bool:
        """True for every file of this volume, including leftover atomic-write temp files."""
        if self.is_image(name) or name in (f"{self.base_name}.info", f"{self.base_name}.meta"):
            return True
        return any(is_temp_of(name, target) for target in (
            self.base_name, f"{self.base_name}.info", f"{self.base_name}.meta")) or (
            name.startswith(f".{self.base_name}.") and name.endswith(".tmp"))

    def existing(self) -> list[Path]:
        """Every file of this volume present in the directory, and nothing else."""
        try:
            names = [entry.name for entry in self.directory.iterdir()]
        except FileNotFoundError:
            return []
        return sorted(self.directory / name for name in names if self.owns(name))


@functools.lru_cache(maxsize=4096)
def _overlay_pattern(base_name: str) -> re.Pattern[str]:
    return re.compile(re.escape(base_name) + r"\." + _UUID)


# the fields of a recorded operation (metadata file, key "operation") that name files, over
# every operation hostvold records (volumes.py, snapshots.py, live.py)
OPERATION_FILE_FIELDS = ("overlay", "top", "base", "higher", "below", "active", "file")
_OPERATION_ID_FIELDS = ("snapshot",)


def record_problems(files: VolumeFiles, operation: dict[str, object] | None,
                    active: str) -> list[str]:
    """What is wrong with the file names a metadata file records, as health problems.

    The metadata file lives on shared storage and can be written by others: every name in
    it must be one of this volume's own image files (a bare name, no ``/``, no ``..``, not
    another volume's file) before any tool, unlink or open sees it. Empty when all is well.
    """
    where = f"{files.base_name}.meta"
    problems = []
    if not files.is_image(active):
        problems.append(f"UntrustedRecord: {where} names {active!r} as the active file, "
                        "which is not one of the volume's files; nothing was done")
    if operation is None:
        return problems
    for key, value in operation.items():
        if key in OPERATION_FILE_FIELDS and value is not None and not (
                isinstance(value, str) and files.is_image(value)):
            problems.append(f"UntrustedRecord: the interrupted operation in {where} names "
                            f"{value!r} as its {key}, which is not one of the volume's "
                            "files; nothing was done")
        elif key in _OPERATION_ID_FIELDS and not (
                isinstance(value, str) and re.fullmatch(_UUID, value)):
            problems.append(f"UntrustedRecord: the interrupted operation in {where} has "
                            f"{value!r} as its {key}, which is not a snapshot id; nothing "
                            "was done")
    if operation.get("base_format", "raw") not in ("raw", "qcow2"):
        problems.append(f"UntrustedRecord: the interrupted operation in {where} records "
                        f"backing format {operation.get('base_format')!r}; nothing was done")
    name = operation.get("name")
    if not isinstance(name, str):
        problems.append(f"UntrustedRecord: the interrupted operation in {where} has no name; "
                        "nothing was done")
    return problems


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def is_temp_of(name: str, target_name: str) -> bool:
    return name.startswith(f".{target_name}.") and name.endswith(".tmp")

"""Names of a volume's files on its share (Cinder's layout plus hostvold's metadata file).

``volume-<id>``              base file
``volume-<id>.<snap-id>``    overlay made when snapshot <snap-id> was taken
``volume-<id>.info``         Cinder's chain map (JSON)
``volume-<id>.meta``         hostvold's own metadata (JSON)
``.volume-<id>….tmp``        an atomic write in progress (removed at recovery)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hostvold.atomic import is_temp_of

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
        return name == self.base_name or re.fullmatch(
            re.escape(self.base_name) + r"\." + _UUID, name) is not None

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

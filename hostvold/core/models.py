"""Requests the service accepts, validated at the boundary (any caller: D-Bus, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hostvold.core.errors import InvalidArgument
from hostvold.core.ids import valid_id

MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a caller's mistake
MAX_FD = (1 << 31) - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, **fields: Any) -> Any:
        """Validate ``fields`` or raise InvalidArgument naming the first bad one."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "request"
            raise InvalidArgument(f"{where}: {error['msg']}") from None


def _optional_id(value: object) -> object:
    return None if value is None else valid_id(value)


class CreateVolume(_Request):
    size: int = Field(gt=0, le=MAX_SIZE, multiple_of=512)
    id: str | None = None
    format: Literal["raw", "qcow2"] | None = None
    provisioning: Literal["thin", "thick"] | None = None
    share: str | None = None

    _check_id = field_validator("id", mode="before")(_optional_id)


def _absolute(value: Path | None) -> Path | None:
    if value is not None and (not value.is_absolute() or ".." in value.parts):
        raise ValueError("must be an absolute path without '..'")
    return value


def _one_of(request: BaseModel, fd_name: str, path_name: str) -> None:
    given = [name for name in (fd_name, path_name) if getattr(request, name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {fd_name} (a file descriptor) or {path_name} "
                         "(a path, root only)")


class ImportVolume(_Request):
    """The image comes as ``fd`` (opened by the caller, for reading) or, from root only, as
    a ``source`` path the daemon opens."""

    fd: int | None = Field(default=None, ge=0, le=MAX_FD)
    source: Path | None = None
    source_format: Literal["raw", "qcow2"] | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_SIZE, multiple_of=512)
    id: str | None = None
    format: Literal["raw", "qcow2"] | None = None
    share: str | None = None

    _check_id = field_validator("id", mode="before")(_optional_id)
    _check_source = field_validator("source")(_absolute)

    @model_validator(mode="after")
    def _image(self) -> ImportVolume:
        _one_of(self, "fd", "source")
        return self


class ExportVolume(_Request):
    """The image goes into ``fd`` (a new file the caller made, open for writing) or, from
    root only, into a new file at ``destination``."""

    fd: int | None = Field(default=None, ge=0, le=MAX_FD)
    destination: Path | None = None
    format: Literal["raw", "qcow2"] = "raw"

    _check_destination = field_validator("destination")(_absolute)

    @model_validator(mode="after")
    def _image(self) -> ExportVolume:
        _one_of(self, "fd", "destination")
        return self


class ExtendVolume(_Request):
    size: int = Field(gt=0, le=MAX_SIZE, multiple_of=512)


class CopyVolume(_Request):
    """Options of clone and create-from-snapshot: the new volume's id, size, format, share."""

    id: str | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_SIZE, multiple_of=512)
    format: Literal["raw", "qcow2"] | None = None
    share: str | None = None

    _check_id = field_validator("id", mode="before")(_optional_id)


class RevertVolume(_Request):
    snapshot: str

    _check_snapshot = field_validator("snapshot", mode="before")(
        lambda value: valid_id(value, "snapshot id"))


class AttachVolume(_Request):
    domain: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00/]+$")
    target: str | None = Field(default=None, pattern=r"^[a-z]{2,3}[a-z]{1,3}$")


class RepairVolume(_Request):
    """``format``: the operator confirms the base file's format (a volume adopted without
    trusted metadata is raw until confirmed otherwise)."""

    format: Literal["raw", "qcow2"] | None = None

"""Requests the service accepts, validated at the boundary (any caller: D-Bus, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hostvold.errors import InvalidArgument
from hostvold.ids import valid_id

MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a caller's mistake


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


class ImportVolume(_Request):
    source: Path
    source_format: Literal["raw", "qcow2"] | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_SIZE, multiple_of=512)
    id: str | None = None
    format: Literal["raw", "qcow2"] | None = None
    share: str | None = None

    _check_id = field_validator("id", mode="before")(_optional_id)

    @field_validator("source")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute() or ".." in value.parts:
            raise ValueError("must be an absolute path without '..'")
        return value


class ExportVolume(_Request):
    destination: Path
    format: Literal["raw", "qcow2"] = "raw"

    @field_validator("destination")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute() or ".." in value.parts:
            raise ValueError("must be an absolute path without '..'")
        return value


class ExtendVolume(_Request):
    size: int = Field(gt=0, le=MAX_SIZE, multiple_of=512)


class CopyVolume(_Request):
    """Options of clone and create-from-snapshot: the new volume's id, size, format, share."""

    id: str | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_SIZE, multiple_of=512)
    format: Literal["raw", "qcow2"] | None = None
    share: str | None = None

    _check_id = field_validator("id", mode="before")(_optional_id)

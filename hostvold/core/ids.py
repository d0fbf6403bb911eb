"""Validation of ids that arrive from callers, before any path is built from them."""

from __future__ import annotations

import re
import uuid

from hostvold.core.errors import InvalidArgument

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_id() -> str:
    return str(uuid.uuid4())


def valid_id(value: object, what: str = "id") -> str:
    """Return ``value`` as a canonical lower-case UUID string, or raise InvalidArgument.

    Only the canonical hyphenated form is accepted, so an id maps to exactly one file name.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string UUID, got {type(value).__name__}")
    lowered = value.lower()
    if not _UUID.match(lowered):
        raise InvalidArgument(f"{what} {value!r} is not a UUID like 3f2a…-…-…-…-… (36 characters)")
    return lowered

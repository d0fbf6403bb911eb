"""The info file keeps Cinder's exact layout (indent 1, keys sorted) from the fast encoder."""

from __future__ import annotations

import json
import uuid

import pytest

from hostvold.storage.infofile import cinder_json


@pytest.mark.parametrize("snapshots", [0, 1, 2, 256])
def test_same_bytes_as_json_indent_1_sorted(snapshots: int) -> None:
    base = f"volume-{uuid.uuid4()}"
    data = {"active": f"{base}.{uuid.uuid4()}"}
    for _ in range(snapshots):
        sid = str(uuid.uuid4())
        data[sid] = f"{base}.{sid}"
    assert cinder_json(data) == json.dumps(data, indent=1, sort_keys=True)


def test_escapes_and_empty_as_json_does() -> None:
    data = {"active": 'a "quoted"\\ name\u00e9\n', "b": "\x00"}
    assert cinder_json(data) == json.dumps(data, indent=1, sort_keys=True)
    assert cinder_json({}) == json.dumps({}, indent=1, sort_keys=True)

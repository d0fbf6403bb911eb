"""GetManagedObjects joined from entries marshalled one by one is, byte for byte, the
message dbus-fast marshals from the whole dict (so any D-Bus peer reads it alike)."""

from __future__ import annotations

import pytest
from dbus_fast import Message, Variant

from hostvold.server.managed import SIGNATURE, JoinedReply, marshal_entry


def _objects(count: int) -> dict[str, dict[str, dict[str, Variant]]]:
    # lengths that leave every remainder modulo 8, nested dicts and arrays, 64-bit values
    return {f"/org/hostvold1/volumes/v{n}": {"org.hostvold1.Volume": {
        "Name": Variant("s", "x" * n), "Size": Variant("t", n << 33),
        "Snapshots": Variant("ao", [f"/org/hostvold1/snapshots/s{k}" for k in range(n % 3)]),
        "Info": Variant("a{sv}", {"path": Variant("s", "/p" * n), "n": Variant("u", n)}),
    }} for n in range(count)}


@pytest.mark.parametrize("count", [0, 1, 2, 9, 40])
def test_joined_entries_are_the_message_dbus_fast_makes(count: int) -> None:
    call = Message(destination=":1.1", path="/org/hostvold1", member="GetManagedObjects",
                   serial=41)
    call.sender = ":1.7"
    objects = _objects(count)
    ours = JoinedReply(call, [marshal_entry(node, values) for node, values in objects.items()])
    theirs = Message.new_method_return(call, SIGNATURE, [objects])
    ours.serial = theirs.serial = 12
    assert bytes(ours._marshall(False)) == bytes(theirs._marshall(False))

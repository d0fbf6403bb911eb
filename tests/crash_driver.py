"""Runs one hostvold operation in a process of its own, for the crash tests.

    python -m tests.crash_driver CONFIG OPERATION JSON_ARGUMENTS

With HOSTVOLD_CRASH_AT set, the process dies at that step (see hostvold.core.crash).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from hostvold.core.config import load_config
from hostvold.core.groups import GroupRequest
from hostvold.server.daemon import Daemon


async def run(config_path: str, operation: str, args: dict[str, Any]) -> None:
    daemon = Daemon(load_config(Path(config_path)))
    volumes = await daemon.start()
    snapshots = daemon.ops
    assert snapshots is not None
    volume = args.pop("volume", None)
    match operation:
        case "create":
            await volumes.create_volume(**args)
        case "import":
            await volumes.import_volume(**args)
        case "delete":
            await volumes.delete_volume(volume)
        case "extend":
            await volumes.extend_volume(volume, **args)
        case "create-snapshot":
            await snapshots.create_snapshot(volume, args["snapshot"])
        case "delete-snapshot":
            await snapshots.delete_snapshot(volume, args["snapshot"])
        case "revert":
            await snapshots.revert(volume, args["snapshot"])
        case "clone":
            await snapshots.clone(volume, **args)
        case "create-from-snapshot":
            await snapshots.create_from_snapshot(volume, args.pop("snapshot"), **args)
        case "group-create":
            await snapshots.groups.create(GroupRequest.parse(volumes=args["volumes"]),
                                          args["group"])
        case "group-delete":
            await snapshots.group_changes.delete(args["group"])
        case "group-revert":
            await snapshots.group_changes.revert(args["group"])
        case _:
            raise SystemExit(f"unknown operation {operation}")


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))

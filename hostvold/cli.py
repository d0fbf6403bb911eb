"""hostvolctl: the command-line client.

The D-Bus commands (status, volumes, snapshots, jobs) talk to the running daemon and arrive
with the D-Bus API. Today it offers what needs no daemon: ``check-config``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hostvold import __version__
from hostvold.config import load_config
from hostvold.daemon import EX_CONFIG
from hostvold.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostvolctl", description="hostvold client")
    parser.add_argument("--version", action="version", version=f"hostvolctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", type=Path, nargs="?", default=None)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        try:
            load_config(args.path)
        except ConfigError as exc:
            print(f"hostvolctl: {exc}", file=sys.stderr)
            return EX_CONFIG
        print(f"{args.path or 'the default configuration'}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())

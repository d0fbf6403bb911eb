"""The D-Bus policy file follows ``admin_group``.

The bus refuses calls before hostvold sees them, so the group its policy lets through must be
the configured ``admin_group``: :func:`render` writes the policy for a group (``python -m
hostvold.server.policy --config FILE`` prints it, ``.ci/setup`` installs it), and
:func:`check_installed` (run at start on the system bus) says, in a warning, when the
installed file names other groups than the configured one.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from hostvold.core.config import load_config
from hostvold.core.errors import ConfigError

BUS_NAME = "org.hostvold1"
INSTALLED = (Path("/etc/dbus-1/system.d/org.hostvold1.conf"),
             Path("/usr/share/dbus-1/system.d/org.hostvold1.conf"))

_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- D-Bus policy of hostvold: install as /usr/share/dbus-1/system.d/org.hostvold1.conf.
     {what}
     The group must be hostvold's admin_group: `python -m hostvold.server.policy` writes this
     file for the configured one. -->
<busconfig>
  <policy user="root">
    <allow own="org.hostvold1"/>
    <allow send_destination="org.hostvold1"/>
  </policy>

  <policy group="{group}">
    <allow send_destination="org.hostvold1"/>
  </policy>

  <policy context="default">
{everyone}
  </policy>
</busconfig>
"""
_POLKIT = ("""Every local user reaches hostvold, which decides each call: reading is open;
     changing anything needs root, the group "{group}", or polkit's authorization
     for the method's action (authorization = polkit).""",
           """    <allow send_destination="org.hostvold1"/>""")
_GROUP = ("""Reading is open to every local user; changing anything needs root or the group
     "{group}" (authorization = group; the daemon checks the same again from the
     caller's credentials).""",
          """    <allow send_destination="org.hostvold1"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.freedesktop.DBus.Peer"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.freedesktop.DBus.ObjectManager"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.freedesktop.DBus.Properties" send_member="Get"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.freedesktop.DBus.Properties" send_member="GetAll"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.hostvold1.Manager" send_member="Status"/>
    <allow send_destination="org.hostvold1"
           send_interface="org.hostvold1.Manager" send_member="ListVolumes"/>""")


def render(group: str, polkit: bool = True) -> str:
    """The policy file for ``admin_group = group`` (a validated group name); with polkit,
    every user's calls reach the daemon, which asks polkit about those outside the group."""
    what, everyone = _POLKIT if polkit else _GROUP
    return _TEMPLATE.format(group=group, what=what.format(group=group), everyone=everyone)


def admitted_groups(xml_text: str) -> set[str]:
    """The groups a policy lets call every method of hostvold ("*": every user)."""
    groups = set()
    for policy in ET.fromstring(xml_text).iter("policy"):
        group = "*" if policy.get("context") == "default" else policy.get("group")
        if group is None:
            continue
        for allow in policy.iter("allow"):
            if allow.get("send_destination") == BUS_NAME and allow.get(
                    "send_interface") is None and allow.get("send_member") is None:
                groups.add(group)
    return groups


def check_installed(admin_group: str, paths: tuple[Path, ...] = INSTALLED,
                    polkit: bool = True) -> list[str]:
    """Warnings about the installed policy, ``admin_group`` and ``authorization`` (empty:
    they agree)."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            return [f"the D-Bus policy {path} cannot be read ({exc}); members of "
                    f"admin_group {admin_group!r} may be refused by the bus"]
        try:
            groups = admitted_groups(text)
        except ET.ParseError as exc:
            return [f"the D-Bus policy {path} is not valid XML ({exc})"]
        fix = f"install the policy for it with `python -m hostvold.server.policy > {path}`"
        warnings = []
        if polkit and "*" not in groups:
            warnings.append(f"authorization is polkit but the D-Bus policy {path} lets only "
                            f"{sorted(groups) or 'root'} call hostvold: what polkit grants "
                            f"anyone else never reaches the daemon; {fix}")
        if not polkit and "*" in groups:
            warnings.append(f"authorization is group but the D-Bus policy {path} lets every "
                            "user call hostvold: the daemon alone refuses those outside "
                            f"admin_group; {fix}")
        if admin_group not in groups and "*" not in groups:
            warnings.append(f"admin_group is {admin_group!r} but the D-Bus policy {path} lets "
                            f"only {sorted(groups) or 'root'} call hostvold: members of "
                            f"{admin_group!r} are refused by the bus; {fix}")
        extra = sorted(groups - {admin_group, "*"})
        if extra:
            warnings.append(f"the D-Bus policy {path} lets group(s) {extra} call hostvold, "
                            f"but admin_group is {admin_group!r}: the daemon refuses them "
                            f"anyway; {fix}")
        return warnings
    return [f"no D-Bus policy for {BUS_NAME} is installed ({' or '.join(map(str, paths))}): "
            "the system bus refuses every call to hostvold; install it with "
            f"`python -m hostvold.server.policy > {paths[-1]}`"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hostvold.server.policy",
                                     description="print the D-Bus policy for admin_group")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--group", action="store_true",
                        help="print the configured admin_group instead")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hostvold.server.policy: {exc}", file=sys.stderr)
        return 78
    group = config.daemon.admin_group
    sys.stdout.write(f"{group}\n" if args.group else
                     render(group, config.daemon.authorization == "polkit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

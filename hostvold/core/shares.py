"""Shares: the list (Cinder's shares-file format), mount points, capacity and placement.

Pure logic; mounting and measuring live in :mod:`hostvold.storage.mounts`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hostvold.core.errors import NoSpace

_REMOTE = re.compile(r"^[^\s/]+:/.*$")


@dataclass(frozen=True)
class ShareSpec:
    """One configured share: ``address`` as written, and how to mount it."""

    address: str
    fstype: str = "nfs"
    options: str = ""
    local_dir: bool = False  # the embedded default: a directory used in place, never mounted

    @functools.cached_property
    def id(self) -> str:
        return share_hash(self.address)  # read for every volume object: hashed once

    def mount_point(self, base: Path) -> Path:
        return Path(self.address) if self.local_dir else base / self.id

    @property
    def host(self) -> str | None:
        """The network host the share lives on (``user@`` and ``[...]`` dropped), or None
        for local storage: a path has no network path to watch."""
        if self.address.startswith("/"):
            return None
        host = self.address.rsplit(":/", 1)[0].rpartition("@")[2]
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclass(frozen=True)
class ShareFileProblem:
    line: int
    text: str
    reason: str


def share_hash(address: str) -> str:
    """md5 of the share string as configured: the mount-point name Cinder and Nova use."""
    return hashlib.md5(address.encode("utf-8"), usedforsecurity=False).hexdigest()


def parse_options(address: str, option_text: str) -> ShareSpec:
    """Build a ShareSpec from the mount options Cinder accepts (``-t TYPE``, ``-o OPTS``)."""
    fstype, options = "nfs", []
    words = shlex.split(option_text)
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-t", "-o") and i + 1 < len(words):
            if word == "-t":
                fstype = words[i + 1]
            else:
                options.append(words[i + 1])
            i += 2
        elif word.startswith("-o") and len(word) > 2:
            options.append(word[2:])
            i += 1
        else:
            raise ValueError(f"unsupported mount option {word!r} (use -t TYPE and -o OPTIONS)")
    if not re.fullmatch(r"[a-z0-9._]+", fstype):
        raise ValueError(f"invalid filesystem type {fstype!r}")
    joined = ",".join(options)
    if not re.fullmatch(r"[A-Za-z0-9_.,=:/@+\-]*", joined):
        raise ValueError(f"invalid characters in mount options {joined!r}")
    local = address.startswith("/") and fstype != "nfs" and ".." not in address.split("/")
    if not (_REMOTE.match(address) or local):
        raise ValueError(f"share {address!r} is not host:/export (or /path with -t TYPE)")
    return ShareSpec(address=address, fstype=fstype, options=joined)


def parse_shares_file(text: str) -> tuple[list[ShareSpec], list[ShareFileProblem]]:
    """Parse a shares file; invalid lines are returned as problems, the rest are kept."""
    shares: list[ShareSpec] = []
    problems: list[ShareFileProblem] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        address, _, option_text = line.partition(" ")
        address = address.replace("\\040", " ")
        try:
            spec = parse_options(address, option_text.strip())
        except ValueError as exc:
            problems.append(ShareFileProblem(number, line, str(exc)))
            continue
        if spec.address in seen:
            problems.append(ShareFileProblem(number, line, "duplicate share"))
            continue
        seen.add(spec.address)
        shares.append(spec)
    return shares, problems


@dataclass(frozen=True)
class Capacity:
    """Bytes on one share. ``allocated`` is the apparent size of volume files;
    ``provisioned`` the sum of their virtual sizes."""

    total: int
    free: int
    allocated: int = 0
    provisioned: int = 0

    @property
    def used_fraction(self) -> float:
        return (self.total - self.free) / self.total if self.total else 1.0


@dataclass(frozen=True)
class Placement:
    reserved_percentage: int = 0
    max_over_subscription_ratio: float = 20.0


@dataclass
class Candidate:
    spec: ShareSpec
    capacity: Capacity
    reasons: list[str] = field(default_factory=list)


def ineligible_reason(capacity: Capacity, size: int, thick: bool, rules: Placement) -> str | None:
    """Why a share cannot take a new volume of ``size`` bytes, or None if it can."""
    limit = (100 - rules.reserved_percentage) / 100
    if capacity.total <= 0:
        return "no capacity reported"
    if capacity.used_fraction >= limit:
        return (f"{capacity.used_fraction:.0%} full, above the "
                f"{100 - rules.reserved_percentage}% allowed by reserved_percentage")
    if capacity.provisioned + size > capacity.total * rules.max_over_subscription_ratio:
        return (f"provisioned {capacity.provisioned} + {size} bytes exceeds "
                f"{rules.max_over_subscription_ratio}x the {capacity.total} bytes of the share")
    if thick and size > capacity.free - capacity.total * (1 - limit):
        return f"a thick volume of {size} bytes does not fit in {capacity.free} free bytes"
    return None


def choose_share(candidates: list[Candidate], size: int, thick: bool,
                 rules: Placement) -> Candidate:
    """The least allocated eligible share (ties keep the configured order)."""
    eligible = []
    for candidate in candidates:
        reason = ineligible_reason(candidate.capacity, size, thick, rules)
        if reason is None:
            eligible.append(candidate)
        else:
            candidate.reasons.append(reason)
    if not eligible:
        detail = "; ".join(f"{c.spec.address}: {', '.join(c.reasons)}" for c in candidates)
        raise NoSpace(f"no share can hold a volume of {size} bytes"
                      + (f" ({detail})" if detail else " (no share is mounted)"))
    return min(eligible, key=lambda c: c.capacity.allocated)

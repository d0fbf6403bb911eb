"""Which domains use a volume's files, as libvirt said a moment ago (pure, no I/O).

hostvold's own attachment record is a belief. Before a step that could change or remove a
volume's data, the libvirt edge (:mod:`hostvold.ops.live`) asks libvirt under the volume's lock
and hands the answer over as :class:`Users`; the use cases decide from it whether to work
offline, go live, keep a definition in step, or refuse with :class:`InUse`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostvold.core.errors import InUse


@dataclass(frozen=True)
class Use:
    """One domain naming a file of the volume in its live XML or its definition."""

    domain: str
    target: str
    source: str | None
    running: bool
    saved: bool = False  # a managed-save image: the next start resumes on these very files

    def describe(self) -> str:
        if self.running:
            how = "running"
        elif self.saved:
            how = "saved; its saved state resumes on these files"
        else:
            how = "defined, shut off"
        return f"domain {self.domain} ({how}, disk {self.target})"


@dataclass(frozen=True)
class Users:
    uses: tuple[Use, ...] = ()

    @property
    def running(self) -> Use | None:
        """The running domain with the volume open, if any."""
        return next((use for use in self.uses if use.running), None)

    @property
    def stopped(self) -> tuple[Use, ...]:
        """Definitions of shut-off domains (no saved state): kept in step with the chain."""
        return tuple(use for use in self.uses if not use.running and not use.saved)

    def refuse_live(self, action: str, volume_id: str) -> None:
        """InUse when a domain has the files open now or will resume on them."""
        busy = [use for use in self.uses if use.running or use.saved]
        if busy:
            raise InUse(f"cannot {action} volume {volume_id}: "
                        f"{'; '.join(use.describe() for use in busy)} uses it")

    def refuse_any(self, action: str, volume_id: str) -> None:
        """InUse when any domain, even one shut off, names the files."""
        if self.uses:
            raise InUse(f"cannot {action} volume {volume_id}: "
                        f"{'; '.join(use.describe() for use in self.uses)} names its files; "
                        "detach it from the domain (or its definition) first")


NOBODY = Users()

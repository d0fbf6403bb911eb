"""Error types.

Every error a caller can see has a stable ``name``; the D-Bus layer maps it to
``org.hostvold1.Error.<name>``. Subclasses refine the message but keep one of the
public names, so clients can match on a small, documented set.
"""

from __future__ import annotations


class HostvoldError(Exception):
    """Base of every error hostvold reports to a caller."""

    name = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


class NotFound(HostvoldError):
    name = "NotFound"


class InvalidArgument(HostvoldError):
    name = "InvalidArgument"


class AlreadyExists(HostvoldError):
    name = "AlreadyExists"


class InvalidState(HostvoldError):
    name = "InvalidState"


class InUse(HostvoldError):
    """A domain (running, defined or saved) uses the volume's files: the change asked for
    would act under it. The message names the domain."""

    name = "InUse"


class Busy(HostvoldError):
    """Another host holds the volume's cluster lock: its operation runs there (or, for a
    host that stopped answering, until its lease ends). The message names the host and
    when its lease ends; try again then."""

    name = "Busy"


class NoSpace(HostvoldError):
    name = "NoSpace"


class StorageUnavailable(HostvoldError):
    name = "StorageUnavailable"


class NotAuthorized(HostvoldError):
    name = "NotAuthorized"


class Failed(HostvoldError):
    name = "Failed"


class HypervisorError(Failed):
    """libvirt refused or failed a call. ``code`` is libvirt's error code; the subclasses
    say what the caller may conclude from it."""

    name = "HypervisorFailed"

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class DomainGone(HypervisorError):
    """libvirt says the domain does not exist (VIR_ERR_NO_DOMAIN): the only error that
    means it is gone."""

    name = "NotFound"


class HypervisorUnavailable(HypervisorError):
    """libvirt cannot be reached or did not answer: nothing can be concluded about the
    domain; whatever was under way stays recorded and is resumed later."""

    name = "HypervisorUnavailable"


class UnsafeImage(HostvoldError):
    """An image or chain that must not be used: it could make us read or write outside
    the volume. Nothing is done with it."""

    name = "UnsafeImage"


class BackingFileOutsideVolume(UnsafeImage):
    name = "BackingFileOutsideVolume"


class ForeignBackingFile(UnsafeImage):
    name = "ForeignBackingFile"


class ExternalDataFile(UnsafeImage):
    name = "ExternalDataFile"


class UnknownImageFeature(UnsafeImage):
    name = "UnknownImageFeature"


class UnsafeFile(UnsafeImage):
    """A file of a volume (or an image a caller handed over) that is not a plain regular
    file: a symbolic link, a device, a FIFO, a socket or a directory. Never opened."""

    name = "UnsafeFile"


class UntrustedRecord(UnsafeImage):
    """A metadata or info file names a file that is not one of the volume's own: the record
    is not acted on, the volume gets a health problem and nothing is touched."""

    name = "UntrustedRecord"


class InfoFileDamaged(InvalidState):
    """The info file (Cinder's chain map) is empty, truncated or names files that are not
    there: the volume needs an explicit repair."""

    name = "InfoFileDamaged"


class NeedsRepair(InvalidState):
    """The volume's files do not match its records; nothing is done until a repair."""

    name = "NeedsRepair"


class QemuImgError(Failed):
    """qemu-img exited non-zero, timed out, or hit a resource limit."""

    name = "QemuImgFailed"

    def __init__(self, argv: list[str], returncode: int | None, stderr: str,
                 context: str = "") -> None:
        tool = argv[argv.index("--") + 1:] if "--" in argv else argv
        command = " ".join(tool[:2]) if tool else "qemu-img"
        lines = stderr.strip().splitlines()
        detail = lines[-1] if lines else "no error output"
        status = "timed out" if returncode is None else f"exited {returncode}"
        suffix = f" ({context})" if context else ""
        super().__init__(f"{command} {status}: {detail}{suffix}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class ConfigError(Exception):
    """An invalid configuration value. ``str()`` is the one line shown to the operator."""

    def __init__(self, source: str, section: str, key: str, value: object, allowed: str) -> None:
        shown = repr(value) if value is not None else "(missing)"
        super().__init__(f"{source}: [{section}] {key} = {shown}: {allowed}")
        self.section = section
        self.key = key

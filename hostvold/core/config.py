"""Configuration: an INI file validated into pydantic models.

Every key keeps Cinder's name where Cinder has one. An invalid value becomes one
:class:`ConfigError` line naming file, section, key, value and what is allowed; the daemon
prints it and exits 78 before any side effect.
"""

from __future__ import annotations

import configparser
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from hostvold.core.errors import ConfigError
from hostvold.core.units import GiB, MiB, parse_size

DEFAULT_PATH = Path("/etc/hostvold/hostvold.conf")

_BOOL = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}


def _bool(value: object) -> object:
    if isinstance(value, str):
        if value.strip().lower() not in _BOOL:
            raise ValueError("not a boolean")
        return _BOOL[value.strip().lower()]
    return value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _size(value: object) -> object:
    return parse_size(value) if isinstance(value, str) else value


def _absolute_path(value: object) -> object:
    if isinstance(value, str):
        if not value.startswith("/") or "\0" in value:
            raise ValueError("not an absolute path")
        return Path(value)
    return value


def _optional(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


Bool = Annotated[bool, BeforeValidator(_bool), Field(description="true or false")]
AbsPath = Annotated[Path, BeforeValidator(_absolute_path), Field(description="an absolute path")]
OptPath = Annotated[AbsPath | None, BeforeValidator(_optional),
                   Field(description="an absolute path, or empty")]
Tristate = Annotated[Literal["auto", "true", "false"], BeforeValidator(_lower),
                     Field(description="one of auto, true, false")]


def _matching(pattern: str) -> Callable[[object], object]:
    """An optional string that must match ``pattern`` whole when set."""
    def check(value: object) -> object:
        value = _optional(value)
        if isinstance(value, str) and not re.fullmatch(pattern, value.strip()):
            raise ValueError("no match")
        return value.strip() if isinstance(value, str) else value
    return check


def _bus(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        if value in ("system", "session") or re.match(r"^(unix|tcp):\S+=\S+$", value):
            return value
        raise ValueError("bad bus")
    return value


def _group(value: object) -> object:
    if isinstance(value, str) and not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", value.strip()):
        raise ValueError("bad group")
    return value.strip() if isinstance(value, str) else value


def _template(value: object) -> object:
    if isinstance(value, str) and not re.match(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*%s[A-Za-z0-9._-]*$",
                                               value.strip()):
        raise ValueError("bad template")
    return value.strip() if isinstance(value, str) else value


def _coordination(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        if value == "" or re.match(r"^file:///\S*$", value) or re.match(
                r"^etcd3\+https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?/?$", value):
            return value
        raise ValueError("bad url")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Section):
    state_dir: AbsPath = Path("/var/lib/hostvold")
    bus: Annotated[str, BeforeValidator(_bus), Field(
        description="system, session, or a D-Bus address such as unix:path=/run/x")] = "system"
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower),
                         Field(description="one of debug, info, warning, error")] = "info"
    admin_group: Annotated[str, BeforeValidator(_group), Field(
        description="a group name (lower case letters, digits, _ and -)")] = "hostvold"
    authorization: Annotated[Literal["polkit", "group"], BeforeValidator(_lower),
                             Field(description="polkit or group")] = "polkit"
    workers: Annotated[int, Field(ge=1, le=64, description="an integer from 1 to 64")] = 4


class SharesConfig(_Section):
    shares_config: OptPath = None
    nas_host: Annotated[str | None, BeforeValidator(_matching(r"[A-Za-z0-9.\-:\[\]]+")),
                        Field(description="a host name or IP address")] = None
    nas_share_path: Annotated[str | None, BeforeValidator(_matching(r"/\S*")),
                              Field(description="an absolute export path")] = None
    nas_mount_options: Annotated[str | None, BeforeValidator(_optional)] = None
    mount_point_base: OptPath = None
    mount_attempts: Annotated[int, Field(ge=1, le=20, description="an integer from 1 to 20")] = 3
    storage_timeout: Annotated[float, Field(
        ge=0.5, le=600, allow_inf_nan=False, description="seconds, from 0.5 to 600")] = 10.0


class VolumesConfig(_Section):
    volume_name_template: Annotated[str, BeforeValidator(_template), Field(
        description="a file name with exactly one %s, such as volume-%s")] = "volume-%s"
    sparsed_volumes: Bool = True
    qcow2_volumes: Bool = False
    max_over_subscription_ratio: Annotated[float, Field(
        ge=1.0, le=1000.0, allow_inf_nan=False, description="a number from 1.0 to 1000")] = 20.0
    reserved_percentage: Annotated[int, Field(
        ge=0, le=100, description="an integer from 0 to 100")] = 0
    nas_secure_file_operations: Tristate = "auto"
    nas_secure_file_permissions: Tristate = "auto"


class LibvirtConfig(_Section):
    uri: Annotated[str, Field(pattern=r"^[a-z0-9+]+://\S*$",
                              description="a libvirt URI such as qemu:///system")] = "qemu:///system"
    quiesce: Annotated[Literal["try", "require", "never"], BeforeValidator(_lower),
                       Field(description="one of try, require, never")] = "try"
    quiesce_timeout: Annotated[int, Field(
        ge=1, le=300, description="seconds from 1 to 300")] = 10
    pivot_retries: Annotated[int, Field(ge=0, le=100, description="an integer from 0 to 100")] = 3
    keepalive: Annotated[int, Field(ge=0, le=600,
                                    description="seconds from 0 (off) to 600")] = 5


class CoordinationConfig(_Section):
    backend_url: Annotated[str, BeforeValidator(_coordination), Field(
        description="empty (local locks), file:///dir or etcd3+http://host:port")] = ""
    host_id: Annotated[str, Field(
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,62})?$",
        description="1 to 63 letters, digits, '.', '_' or '-' (default: the hostname)")] = ""
    lease_seconds: Annotated[int, Field(
        ge=3, le=300, description="seconds from 3 to 300")] = 30
    rescan_interval: Annotated[int, Field(
        ge=1, le=3600, description="seconds from 1 to 3600")] = 30

    @property
    def host(self) -> str:
        """This host's id in the cluster: ``host_id``, or the hostname."""
        return self.host_id or socket.gethostname()

    @property
    def distributed(self) -> bool:
        return self.backend_url.startswith("etcd3+")


class LimitsConfig(_Section):
    qemu_img_cpu_seconds: Annotated[int, Field(
        ge=1, le=3600, description="an integer from 1 to 3600")] = 30
    qemu_img_address_space: Annotated[int, BeforeValidator(_size), Field(
        ge=16 * MiB, le=64 * GiB, description="a size from 16M to 64G")] = GiB


class Config(_Section):
    daemon: DaemonConfig = DaemonConfig()
    shares: SharesConfig = SharesConfig()
    volumes: VolumesConfig = VolumesConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    coordination: CoordinationConfig = CoordinationConfig()
    limits: LimitsConfig = LimitsConfig()

    @property
    def mount_point_base(self) -> Path:
        return self.shares.mount_point_base or self.daemon.state_dir / "mnt"

    @property
    def local_share_dir(self) -> Path:
        """The embedded default share, used when no share is configured."""
        return self.daemon.state_dir / "share"

    @property
    def has_configured_shares(self) -> bool:
        return self.shares.shares_config is not None or self.shares.nas_host is not None


_SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Config.model_fields.items()
}


def _allowed(model: type[_Section], key: str) -> str:
    field = model.model_fields.get(key)
    if field is None:
        return "unknown key; known keys: " + ", ".join(model.model_fields)
    if field.description:
        return "must be " + field.description
    for meta in field.metadata:
        description = getattr(meta, "description", None)
        if isinstance(description, str):
            return "must be " + description
    return "invalid value"  # pragma: no cover


def parse_config(text: str, source: str = "<config>") -> Config:
    parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="\0")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError(source, "-", "-", None, "not an INI file: " + " ".join(
            str(exc).split())) from None
    sections: dict[str, Any] = {}
    for name in parser.sections():
        model = _SECTIONS.get(name)
        if model is None:
            raise ConfigError(source, name, "-", None,
                              "unknown section; known sections: " + ", ".join(_SECTIONS))
        values = dict(parser.items(name))
        try:
            sections[name] = model.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = str(error["loc"][0]) if error["loc"] else "-"
            raise ConfigError(source, name, key, values.get(key), _allowed(model, key)) from None
    config = Config.model_validate(sections)
    _check_relations(config, source)
    return config


def _check_relations(config: Config, source: str) -> None:
    shares = config.shares
    if (shares.nas_host is None) != (shares.nas_share_path is None):
        key = "nas_share_path" if shares.nas_host else "nas_host"
        raise ConfigError(source, "shares", key, None,
                          "nas_host and nas_share_path must be set together")
    if shares.nas_host and shares.shares_config:
        raise ConfigError(source, "shares", "shares_config", str(shares.shares_config),
                          "set either shares_config or nas_host/nas_share_path, not both")
    if shares.shares_config and not shares.shares_config.is_file():
        raise ConfigError(source, "shares", "shares_config", str(shares.shares_config),
                          "must name an existing shares file")


def load_config(path: Path | None) -> Config:
    """Load ``path``; with None, the default file if it exists, else the embedded default."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config()
        path = DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "-", "-", None,
                          f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "-", "-", None, "the file is not UTF-8 text") from None
    return parse_config(text, str(path))

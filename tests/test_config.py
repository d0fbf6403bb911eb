"""Configuration: every invalid value stops the daemon with one line and exit status 78."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hostvold.core.config import Config, parse_config
from hostvold.core.errors import ConfigError

# (config text, words the one-line message must contain)
INVALID = [
    ("[daemon]\nstate_dir = relative/dir\n", ["[daemon] state_dir", "'relative/dir'",
                                              "absolute path"]),
    ("[daemon]\nbus = carrier-pigeon\n", ["[daemon] bus", "system, session"]),
    ("[daemon]\nlog_level = loud\n", ["[daemon] log_level", "debug, info"]),
    ("[daemon]\nadmin_group = Wheel Group\n", ["[daemon] admin_group", "group name"]),
    ("[daemon]\nworkers = 0\n", ["[daemon] workers", "'0'", "1 to 64"]),
    ("[daemon]\nworkers = many\n", ["[daemon] workers", "'many'", "1 to 64"]),
    ("[shares]\nmount_attempts = 0\n", ["[shares] mount_attempts", "1 to 20"]),
    ("[shares]\nshares_config = /nonexistent/shares\n", ["[shares] shares_config",
                                                         "existing shares file"]),
    ("[shares]\nnas_host = filer1\n", ["[shares] nas_share_path", "set together"]),
    ("[shares]\nnas_host = bad host!\nnas_share_path = /x\n", ["[shares] nas_host",
                                                               "host name"]),
    ("[shares]\nmount_point_base = mnt\n", ["[shares] mount_point_base", "absolute path"]),
    ("[volumes]\nvolume_name_template = volume\n", ["[volumes] volume_name_template", "%s"]),
    ("[volumes]\nvolume_name_template = ../%s\n", ["[volumes] volume_name_template"]),
    ("[volumes]\nsparsed_volumes = perhaps\n", ["[volumes] sparsed_volumes", "true or false"]),
    ("[volumes]\nmax_over_subscription_ratio = 0.5\n", ["max_over_subscription_ratio",
                                                        "1.0 to 1000"]),
    ("[volumes]\nmax_over_subscription_ratio = auto\n", ["max_over_subscription_ratio"]),
    ("[volumes]\nreserved_percentage = 101\n", ["[volumes] reserved_percentage", "0 to 100"]),
    ("[volumes]\nnas_secure_file_permissions = sometimes\n", ["nas_secure_file_permissions",
                                                               "auto, true, false"]),
    ("[libvirt]\nquiesce = always\n", ["[libvirt] quiesce", "try, require, never"]),
    ("[libvirt]\nuri = qemu\n", ["[libvirt] uri", "libvirt URI"]),
    ("[libvirt]\npivot_retries = -1\n", ["[libvirt] pivot_retries", "0 to 100"]),
    ("[coordination]\nbackend_url = redis://x\n", ["[coordination] backend_url", "etcd3"]),
    ("[coordination]\nrescan_interval = 0\n", ["[coordination] rescan_interval", "'0'",
                                            "1 to 3600"]),
    ("[coordination]\nrescan_interval = soon\n", ["[coordination] rescan_interval", "'soon'"]),
    ("[limits]\nqemu_img_cpu_seconds = 0\n", ["[limits] qemu_img_cpu_seconds", "1 to 3600"]),
    ("[limits]\nqemu_img_address_space = 1K\n", ["qemu_img_address_space", "16M to 64G"]),
    ("[limits]\nqemu_img_address_space = lots\n", ["qemu_img_address_space", "'lots'"]),
    ("[volumes]\nsparse_volumes = true\n", ["[volumes] sparse_volumes", "unknown key"]),
    ("[volume]\nsize = 1\n", ["[volume]", "unknown section"]),
    ("this is not ini\n", ["not an INI file"]),
]


@pytest.mark.parametrize(("text", "words"), INVALID, ids=[w[0] for _, w in INVALID])
def test_invalid_value_exits_78_with_one_line(tmp_path: Path, text: str,
                                              words: list[str]) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "hostvold.conf"
    state_line = f"state_dir = {state_dir}\n"
    if "state_dir" in text:
        pass
    elif "[daemon]\n" in text:
        text = text.replace("[daemon]\n", "[daemon]\n" + state_line)
    else:
        text = "[daemon]\n" + state_line + text
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "hostvold", "--config", str(config)],
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hostvold: {config}: ")
    for word in words:
        assert word in lines[0]
    assert not state_dir.exists()  # no side effect before the config is valid


def test_defaults_match_the_documented_file() -> None:
    """hostvold.conf documents every key with its default: parsing it gives the defaults."""
    documented = Path(__file__).resolve().parent.parent / "hostvold.conf"
    text = documented.read_text()
    uncommented = re.sub(r"(?m)^# ([a-z0-9_]+ =.*)$", r"\1", text)
    assert parse_config(uncommented, str(documented)) == Config()
    for section, model in Config.model_fields.items():
        assert f"[{section}]" in text
        assert model.annotation is not None
        for key in model.annotation.model_fields:
            assert f"# {key} =" in text, f"{section}.{key} is not documented in hostvold.conf"


def test_valid_values_parse() -> None:
    config = parse_config("[volumes]\nreserved_percentage = 5\nsparsed_volumes = no\n"
                          "[limits]\nqemu_img_address_space = 2G\n"
                          "[daemon]\nbus = unix:path=/run/x\nlog_level = DEBUG\n"
                          "[coordination]\nbackend_url = etcd3+http://10.0.0.1:2379\n"
                          "rescan_interval = 5\n")
    assert config.volumes.reserved_percentage == 5
    assert config.volumes.sparsed_volumes is False
    assert config.limits.qemu_img_address_space == 2 << 30
    assert config.daemon.log_level == "debug"
    assert config.coordination.rescan_interval == 5 and Config().coordination.rescan_interval == 30
    assert config.mount_point_base == Path("/var/lib/hostvold/mnt")


def test_error_type_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[volumes]\nreserved_percentage = x\n", "f.conf")
    assert info.value.section == "volumes" and info.value.key == "reserved_percentage"


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (64 << 20, "64.0 MiB"), (270553174016, "252.0 GiB"), (3 << 40, "3.0 TiB"),
    (5 << 50, "5.0 PiB"), (1 << 62, "4096.0 PiB")])
def test_sizes_for_people(size: int, shown: str) -> None:
    """hostvolctl's tables: IEC units, one decimal; --json keeps exact bytes."""
    from hostvold.core.units import human_size
    assert human_size(size) == shown

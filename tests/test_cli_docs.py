"""Man pages and bash completion generated from the parsers (issue 14): the pages render
with `man -l`; the completion loads in bash and completes commands, options, choices and
the ids of the running daemon's volumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonProcess, Host, need
from tests.test_dbus import Cli, with_bus


def generate(directory: Path) -> None:
    subprocess.run([sys.executable, "-m", "hostvold.client.docs", str(directory)], check=True)


def test_man_pages_render(tmp_path: Path) -> None:
    need(shutil.which("man") is not None, "man (Debian package man-db)")
    generate(tmp_path)
    for page, words in (("hostvolctl.1", ["connection-info", "monitor", "EXIT STATUS"]),
                        ("hostvold.8", ["SIGUSR1", "hostvold.conf(5)"]),
                        ("hostvold.conf.5", ["[shares]", "storage_timeout"])):
        shown = subprocess.run(["man", "-l", str(tmp_path / page)], capture_output=True,
                               text=True, env=dict(os.environ, MANWIDTH="100", PAGER="cat"))
        assert shown.returncode == 0 and not shown.stderr.strip(), (page, shown.stderr)
        assert "NAME" in shown.stdout
        for word in words:
            assert word in shown.stdout, (page, word)


def complete(script: Path, line: list[str], env: dict[str, str]) -> list[str]:
    words = " ".join(f"'{word}'" for word in line)
    shell = (f"source {script}; COMP_WORDS=({words}); COMP_CWORD={len(line) - 1}; "
             "_hostvolctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env,
                         check=True).stdout
    return [word for word in out.splitlines() if word]


def test_bash_completion(tmp_path: Path, host_factory: Callable[..., Host],
                         bus_factory: Callable[[str], str],
                         daemon_factory: Callable[..., DaemonProcess]) -> None:
    generate(tmp_path)
    script = tmp_path / "hostvolctl"
    shim = tmp_path / "bin"
    shim.mkdir()  # `hostvolctl` as the completion calls it: this checkout's client
    (shim / "hostvolctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m hostvold.client "
                                     '"$@"\n')
    (shim / "hostvolctl").chmod(0o755)
    address = bus_factory("hostvold")
    daemon_factory(with_bus(host_factory(64), address))
    env = dict(os.environ, HOSTVOLD_BUS=address, PATH=f"{shim}:{os.environ['PATH']}")
    assert complete(script, ["hostvolctl", "sh"], env) == ["shares", "show"]
    assert "connection-info" in complete(script, ["hostvolctl", "co"], env)
    assert complete(script, ["hostvolctl", "--js"], env) == ["--json"]
    assert complete(script, ["hostvolctl", "snapshot", "cr"], env) == ["create",
                                                                      "create-volume"]
    assert complete(script, ["hostvolctl", "create", "1M", "--fo"], env) == ["--format"]
    volumes = sorted(Cli(address).json("create", "1M")["Id"] for _ in range(2))
    assert sorted(complete(script, ["hostvolctl", "show", ""], env)) == volumes
    assert complete(script, ["hostvolctl", "--json", "delete", volumes[0][:8]],
                    env) == [volumes[0]]

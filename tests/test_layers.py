"""The import contracts, stated in pyproject.toml (``[tool.importlinter]``) and checked by
import-linter, and the size limits of modules and classes.

    core     pure models, errors, planning, naming: imports nothing else of hostvold
    storage  files, qcow2 headers, qemu-img, mounts, index, locks: core
    virt     the libvirt edge: core
    ops      use cases over the volume store: core, storage, virt; never dbus_fast
             offline use cases never import the libvirt edge or the live ones, and the
             live ones never import the offline ones: only ops.operations decides
    server   daemon, bus, D-Bus objects: anything but the client; the interface modules
             depend on the ``Api`` protocol (server/api.py), never on the registry
    client   hostvolctl: core only (it talks to the daemon over D-Bus)
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hostvold"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the package under ``root`` with the repo's contracts."""
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"),
                           "--no-cache"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root)), timeout=120)


def test_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_broken_contract_is_caught(tmp_path: Path) -> None:
    """The contracts really look: a core module importing storage, an offline use case
    importing a live one, and an interface importing the registry behind TYPE_CHECKING."""
    shutil.copytree(PACKAGE, tmp_path / "hostvold",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "hostvold" / "core" / "units.py", "a") as core:
        core.write("\nfrom hostvold.storage.atomic import write_atomic  # noqa\n")
    with open(tmp_path / "hostvold" / "ops" / "volumes.py", "a") as offline:
        offline.write("\nfrom hostvold.ops.live import LiveVolumes  # noqa\n")
    with open(tmp_path / "hostvold" / "server" / "job.py", "a") as interface:
        interface.write("\nif TYPE_CHECKING:\n    from hostvold.server.objects import Api\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "hostvold.core.units -> hostvold.storage.atomic" in result.stdout
    assert "hostvold.ops.volumes -> hostvold.ops.live" in result.stdout
    assert "hostvold.server.job -> hostvold.server.objects" in result.stdout


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400


def _is_property(decorator: ast.expr) -> bool:
    """Python and D-Bus properties are declarations, not behaviour."""
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    return isinstance(decorator, ast.Name) and decorator.id in ("property", "dbus_property")


def test_no_class_with_more_than_15_public_methods() -> None:
    crowded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = [f for f in node.body
                           if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                           and not f.name.startswith("_")
                           and not any(_is_property(d) for d in f.decorator_list)]
                if len(methods) > 15:
                    crowded.append(f"{path.name}:{node.name} ({len(methods)})")
    assert crowded == []

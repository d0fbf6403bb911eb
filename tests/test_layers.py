"""The allowed import directions between hostvold's layers, read from the source.

    core     pure models, errors, planning, naming: imports nothing else of hostvold
    storage  files, qcow2 headers, qemu-img, mounts, index, locks: core
    virt     the libvirt edge: core
    ops      use cases over the volume store: core, storage, virt; never dbus_fast
             offline use cases never import the libvirt edge or the live ones, and the
             live ones never import the offline ones: only ops.operations decides
    server   daemon, bus, D-Bus objects: anything but the client
    client   hostvolctl: core only (it talks to the daemon over D-Bus)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hostvold"

LAYERS = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "virt": {"core", "virt"},
    "ops": {"core", "storage", "virt", "ops"},
    "server": {"core", "storage", "virt", "ops", "server"},
    "client": {"core", "client"},
}
OFFLINE = {"ops.store", "ops.startup", "ops.volumes", "ops.snapshots", "ops.copies",
           "ops.repair", "ops.jobs"}
LIVE = {"ops.attachments", "ops.live", "ops.live_delete"}
FOREIGN = {"ops": {"dbus_fast"}, "core": {"dbus_fast", "libvirt", "libvirtaio"},
           "storage": {"dbus_fast", "libvirt"}, "client": {"libvirt"}}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth, type-checking included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "hostvold":
                found |= {f"hostvold.{alias.name}" for alias in node.names}
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if len(parts) < 2:
            continue  # hostvold/__init__.py, __main__.py: the entry points
        layer, module = parts[0], ".".join(parts[:2])
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FOREIGN.get(layer, set()):
                wrong.append(f"{module} imports {name}")
            if top != "hostvold" or name == "hostvold":
                continue
            target = name.split(".")[1]
            target_module = ".".join(name.split(".")[1:3])
            if target not in LAYERS and not (package / target).is_dir():
                continue  # the package root itself (__version__): open to every layer
            if target not in LAYERS[layer]:
                wrong.append(f"{module} ({layer}) imports {name} ({target})")
            elif module in OFFLINE and (target == "virt" or target_module in LIVE):
                wrong.append(f"{module} (offline) imports {name}")
            elif module in LIVE and target_module in OFFLINE - {"ops.store", "ops.jobs"}:
                wrong.append(f"{module} (live) imports {name}")
    return wrong


def test_import_directions() -> None:
    assert violations() == []


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The contract really looks: a core module importing storage is reported."""
    fake = tmp_path / "hostvold"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("from hostvold.storage.atomic import write_atomic\n")
    (fake / "ops").mkdir()
    (fake / "ops" / "volumes.py").write_text("from hostvold.ops.live import LiveVolumes\n")
    assert violations(fake) == [
        "core.bad (core) imports hostvold.storage.atomic (storage)",
        "ops.volumes (offline) imports hostvold.ops.live"]


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

"""The shape of the code: import layers, no circles, device internals stay inside ``device/``,
and the README's layout table names what is really there."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from device import BalloonDevice

ROOT = Path(__file__).resolve().parents[2]
#: The device process: what runs beside QEMU, installed without the VM harness.
PROCESS_PACKAGES = ("device", "vhost_user", "vfio_user", "virtio_pci", "vballoon")
PACKAGES = (*PROCESS_PACKAGES, "vm_harness")
#: What each package may import besides itself: every import points down a floor (the
#: process and the harness share the top floor; the harness may use the process).
ALLOWED = {
    "device": set(),
    "vhost_user": {"device"},
    # a general vfio-user server: no device, no virtio
    "vfio_user": set(),
    "virtio_pci": {"device", "vfio_user"},
    "vballoon": {"device", "vhost_user", "vfio_user", "virtio_pci"},
    "vm_harness": {"device", "vhost_user", "vfio_user", "virtio_pci", "vballoon"},
}
#: ``vballoon`` imports the harness only inside functions (``demo``, ``bench vm``).
LAZY_ONLY = {("vballoon", "vm_harness")}
#: What nothing above ``device/`` may touch: the device's internals.
DEVICE_INTERNALS = {"engine", "_engine", "_status", "_queues", "_broken", "_stats"}
#: Private modules of ``device`` (``device._accel``...) stay inside it, except for the
#: benchmark that times the C data plane itself against raw syscalls.
PRIVATE_ALLOWED = {"vballoon.bench"}


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


ALL = {name: path for pkg in PACKAGES for name, path in modules(pkg).items()}


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules of ours that ``path`` imports (``from a.b import c`` counts a.b and a.b.c)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in ALL}


def test_layers_point_down() -> None:
    bad = []
    for name, path in ALL.items():
        pkg = name.split(".")[0]
        top_level = imports(path, top_level_only=True)
        for target in imports(path, top_level_only=False):
            tpkg = target.split(".")[0]
            if tpkg == pkg or tpkg in ALLOWED[pkg]:
                continue
            if (pkg, tpkg) in LAZY_ONLY and target not in top_level:
                continue
            bad.append(f"{name} imports {target}")
    assert bad == []


def test_nothing_above_device_reaches_its_internals() -> None:
    offenders = []
    for name, path in ALL.items():
        if name.startswith("device"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in DEVICE_INTERNALS:
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
        if name in PRIVATE_ALLOWED:
            continue
        for target in imports(path, top_level_only=False):
            if target.startswith("device._"):
                offenders.append(f"{name} imports {target}")
    assert offenders == []
    # The lifecycle is the device's: no writable status or engine on its surface.
    assert not hasattr(BalloonDevice, "status") and not hasattr(BalloonDevice, "engine")


def test_no_import_circles() -> None:
    graph = {name: imports(path, top_level_only=False) for name, path in ALL.items()}
    # A package's __init__ re-exports its modules, so a module importing its own package's
    # public API (``from device import X`` inside device/) is a circle too.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == n:
                continue
            if state.get(m) == 1:
                cycles.append(" -> ".join([*stack[stack.index(m) :], m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert cycles == []


def test_the_process_package_never_loads_the_harness_at_import() -> None:
    names = [n for pkg in PROCESS_PACKAGES for n in modules(pkg) if not n.endswith("__main__")]
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    out[name] = sorted(m for m in sys.modules if m.split('.')[0] == 'vm_harness')\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout)
    assert set(loaded) == set(names)
    assert {name: mods for name, mods in loaded.items() if mods} == {}


def _layout_paths(readme: str) -> list[str]:
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_readme_layout_table_matches_the_tree() -> None:
    paths = _layout_paths((ROOT / "README.md").read_text())
    assert paths, "README has no layout table"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")}
    named = {p.rstrip("/").split("/")[0] for p in paths}
    assert top - named == set(), "top-level directories the README's layout does not name"

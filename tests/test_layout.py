"""Rules of the house, checked: the linter, one-way dependencies between layers, no private
names across modules, notebooks committed without outputs."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mmclinic"

# Lower layers never import higher ones. A module may import its own layer and those below it.
LAYERS: list[tuple[str, ...]] = [
    ("mmclinic.errors",),
    ("mmclinic.config", "mmclinic.phi"),
    ("mmclinic.tracking", "mmclinic.artifacts", "mmclinic.display"),
    ("mmclinic.text",),
    ("mmclinic.data",),
    ("mmclinic.models",),
    ("mmclinic.eval",),
    ("mmclinic.training",),
    ("mmclinic.serve",),
    ("mmclinic.cli", "mmclinic.demo"),
]


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import, at any depth."""
    out = []
    package = module if (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists() else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from mmclinic.data import images` imports the module mmclinic.data.images
            for n in names:
                sub = f"{base}.{n}"
                if (PACKAGE / Path(*sub.split(".")[1:])).with_suffix(".py").exists():
                    out.append((sub, [], node.lineno))
                else:
                    out.append((base, [n], node.lineno))
    return [(m, n, line) for m, n, line in out if m == "mmclinic" or m.startswith("mmclinic.")]


def test_every_package_module_has_a_layer():
    missing = [m for m in _modules() if m != "mmclinic" and _layer(m) is None]
    assert not missing, f"modules outside the layer map in tests/test_layout.py: {missing}"


def test_dependencies_flow_one_way():
    bad = []
    for module, tree in _modules().items():
        mine = _layer(module)
        if mine is None:
            continue
        for target, _, line in _imports(tree, module):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                bad.append(f"{module}:{line} imports {target} (layer {LAYERS[theirs][0]} above {LAYERS[mine][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    modules = _modules()
    bad = []
    for module, tree in modules.items():
        aliases: dict[str, str] = {}
        for target, names, line in _imports(tree, module):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != module:
                    bad.append(f"{module}:{line} imports {target}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmclinic"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules (make them public or keep them in one module):\n" + \
        "\n".join(sorted(set(bad)))


def test_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a data module importing evaluation code is caught."""
    tree = ast.parse("from mmclinic.eval.metrics import ranks\n")
    found = [(t, _layer(t)) for t, _, _ in _imports(tree, "mmclinic.data.negatives")]
    assert found == [("mmclinic.eval.metrics", LAYERS.index(("mmclinic.eval",)))]
    assert _layer("mmclinic.data.negatives") < found[0][1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in requirements.lock: make venv installs it)")
    proc = subprocess.run([ruff, "check", "--no-cache", "mmclinic", "tests", "bench", "reliability"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks
    bad = []
    for nb in notebooks:
        doc = json.loads(nb.read_text())
        assert doc.get("metadata", {}).get("kernelspec"), f"{nb.name}: no kernelspec metadata (papermill needs it)"
        for i, cell in enumerate(doc["cells"]):
            if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                bad.append(f"{nb.name} cell {i}")
    assert not bad, "notebooks with outputs or execution counts (strip them before committing): " + ", ".join(bad)

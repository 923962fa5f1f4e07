"""The package's layout holds: layers import only downwards, every storage key is spelled in
one module, and no module grows past what a reader takes in at once."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nixeryd"
LAYERS = ["core", "image", "storage", "ops", "build", "registry", "http"]
"""Lowest first; ``storage`` and ``ops`` are side by side (neither imports the other).
Modules at the package's top (settings, wiring, the command) stand above them all."""
SIDE_BY_SIDE = {frozenset({"storage", "ops"})}
MAX_LINES = 400
MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> int:
    """The rank of ``nixeryd.<a>.<b>``: its subpackage's place, or above every layer."""
    parts = module.split(".")
    if len(parts) < 2:
        return -1  # nixeryd itself: its version, importable from anywhere
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)


def imports_of(path: Path) -> list[str]:
    """Every nixeryd module ``path`` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nixeryd":
            if node.module == "nixeryd":
                found.extend(f"nixeryd.{alias.name}" for alias in node.names if alias.name != "__version__")
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if alias.name.split(".")[0] == "nixeryd")
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path: Path) -> None:
    """A module imports from its own layer or those below it, never from above."""
    here = module_name(path)
    rank = layer_of(here)
    for imported in imports_of(path):
        theirs = layer_of(imported)
        pair = frozenset({here.split(".")[1] if rank < len(LAYERS) else "", imported.split(".")[1]})
        if rank != theirs and pair in SIDE_BY_SIDE:
            pytest.fail(f"{here} imports {imported}: storage and ops stand side by side")
        assert theirs <= rank, f"{here} (layer {rank}) imports {imported} (layer {theirs}), above it"


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check above would fail for storage importing the registry, inside a function too."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from nixeryd.registry.images import Images\n")
    assert [layer_of(m) for m in imports_of(module)] == [LAYERS.index("registry")]
    assert layer_of("nixeryd.storage.filesystem") < LAYERS.index("registry")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_longer_than_a_reader_holds(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


KEY_LITERAL = re.compile(r"""["'](?:layers|manifests|builds|tags|leases)/""")


def test_storage_keys_are_spelled_in_one_module() -> None:
    """Only ``storage/records.py`` spells a storage key's prefix."""
    spelled = [str(path.relative_to(PACKAGE)) for path in MODULES if KEY_LITERAL.search(path.read_text())]
    assert spelled == []
    assert KEY_LITERAL.search('x = "manifests/" + key')

"""common/ is in layers (docs/development.md): a module imports only from its own package and the layers below."""

import ast
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parent.parent / "common"
LAYER = {"errors": 0, "quiet": 0, "io": 1, "numerics": 2, "model": 2, "lora": 3, "taskvec": 3}
LAYER |= {"combine": 4, "compare": 5, "analysis": 6, "cli": 7}


def imports_of(path: Path) -> list[str]:
    """Every common.* module a file imports, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "common"]
    return found


MODULES = sorted(p for p in COMMON.rglob("*.py") if p.name != "__init__.py" or p.parent != COMMON)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(COMMON)))
def test_imports_point_down(path):
    package = path.relative_to(COMMON).with_suffix("").parts[0]
    upward = []
    for module in imports_of(path):
        parts = module.split(".")
        assert len(parts) > 1, f"{path}: imports the whole of common"
        if parts[1] != package and LAYER[parts[1]] >= LAYER[package]:
            upward.append(module)
    assert upward == []


def test_every_package_has_a_layer():
    packages = {p.relative_to(COMMON).with_suffix("").parts[0] for p in MODULES}
    assert packages == set(LAYER)

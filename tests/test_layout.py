"""The layout's rules (docs/architecture.md), checked on the code itself: method packages do not import each other
or the shapes world, never name the tiny model, and no runtime module grows past ~500 lines."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hyperreal"
METHODS = ("adapters", "controlnet", "bridge")
FILES = ("spec.py", "files.py", "runtime.py", "train.py")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports resolved against its package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level] if node.level else ()
            module = ".".join(base + tuple((node.module or "").split("."))).strip(".")
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("method", METHODS)
def test_each_method_has_the_same_files_and_imports_no_other_method_or_the_shapes_world(method):
    folder = PACKAGE / "methods" / method
    assert all((folder / f).is_file() for f in FILES)
    others = [f"hyperreal.methods.{m}" for m in METHODS if m != method]
    for path in folder.glob("*.py"):
        names = imported_modules(path)
        assert not [n for n in names if n.startswith("hyperreal.shapes")], path
        assert not [n for n in names for o in others if n == o or n.startswith(o + ".")], path
        code = "".join(line.split("#")[0] for line in path.read_text().splitlines(keepends=True))
        assert "tiny" not in code.lower(), f"{path} names the tiny model; put what differs per base in its defaults"


def test_the_ui_never_imports_a_method_s_internals():
    """Tabs reach methods through services and the methods' packages (their public names), never their files."""
    internal = [f".{f[:-3]}" for f in FILES] + [".tokens", ".conditions", ".encoders"]
    for path in (PACKAGE / "ui").glob("*.py"):
        for name in imported_modules(path):
            if name.startswith("hyperreal.methods."):
                assert not any(part in name for part in internal), (path, name)


def test_no_runtime_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long

"""The package's shape: files of a few hundred lines, functions that fit a screen, imports at the top, and
imports that run one way through the layers (config <- model <- parallel <- checkpoints <- infer, train <- plan
<- plots <- cli)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "l4jax"
MODULES = sorted(PACKAGE.rglob("*.py"))
# Each package may import only from the ones to its left (and itself); the root modules are the foundation.
LAYERS = ("_lazy", "config", "tree", "model", "parallel", "checkpoints", "data", "infer", "train", "plan", "plots",
          "cli")
OPTIONAL: set[str] = set()  # optional dependencies, which may be imported where they are used
# The command line imports each command's modules when that command runs (`l4jax convert` never loads Flax or the
# model: ~1.1 s of start-up); still only downward.
LAZY = {"cli.py"}


def _layer(module: str) -> str:
    """'l4jax.model.moe' -> 'model'; 'l4jax' (the re-exports) -> 'cli', the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(path: Path):
    """(l4jax module imported, line) for every import of the package, relative ones resolved."""
    tree = ast.parse(path.read_text())
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            for m in names:
                if m.startswith("l4jax"):
                    yield m, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("l4jax"):
                    yield a.name, node.lineno


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short_and_its_functions_fit_a_screen(path):
    source = path.read_text()
    assert source.count("\n") <= 400, f"{path.name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_sit_at_the_top_and_run_one_way(path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree) if path.name not in LAZY else ():
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert all(n.split(".")[0] in OPTIONAL for n in names), \
                        f"{path.name}:{node.lineno} imports {names} inside {fn.name}"
    mine = LAYERS.index(_layer(_name(path)))
    for module, line in _imports(path):
        theirs = LAYERS.index(_layer(module))
        assert theirs <= mine, f"{path.name}:{line} imports {module} ({LAYERS[theirs]} sits above {LAYERS[mine]})"


def test_the_layout_check_sees_a_violation(tmp_path):
    """The checks above can fail: an upward import inside a function is found."""
    bad = PACKAGE / "model" / "_probe_for_test.py"
    bad.write_text("def f():\n    from ..infer import load\n    return load\n")
    try:
        with pytest.raises(AssertionError, match="inside f"):
            test_imports_sit_at_the_top_and_run_one_way(bad)
    finally:
        bad.unlink()

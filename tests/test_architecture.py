"""The tree shows the architecture: saev_core's sub-packages are layers, and a module imports only its own layer and
the layers below it (docs/architecture.md draws them). Read from the source, so imports inside functions count."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "saev_core"

# Lowest first. A module's layer is its sub-package, or its own name for the top-level modules.
LAYERS: list[set[str]] = [
    {"errors", "files", "tables", "threads", "config"},
    {"store"},
    {"record"},
    {"nn"},
    {"train"},
    {"visuals"},
    {"analysis"},
    {"pipeline"},
    {"activations", "explorer", "__main__", "__init__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# The base is ordered too: errors, then files and tables, then config.
BASE_ORDER = {"errors": 0, "files": 1, "tables": 1, "threads": 1, "config": 2}


def layer_of(module: str) -> str:
    """'saev_core.store.loader' -> 'store'; 'saev_core.errors' -> 'errors'."""
    parts = module.split(".")
    assert parts[0] == "saev_core", module
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every saev_core module the file imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("saev_core")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saev_core"):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write saev_core.... in full")
            if node.module == "saev_core":  # from saev_core import config, nn: each name is a module
                found += [(node.lineno, f"saev_core.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
    for path in modules():
        rel = path.relative_to(PACKAGE)
        name = rel.parts[0].removesuffix(".py")
        assert name in RANK, f"{rel} is in no layer of tests/test_architecture.py (and docs/architecture.md)"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_its_layer_and_those_below(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for line, module in imports_of(path):
        target = layer_of(module)
        assert target in RANK, f"{path.name}:{line} imports {module}, which is in no layer"
        assert RANK[target] <= RANK[own], (
            f"saev_core/{path.relative_to(PACKAGE)}:{line} imports {module}: layer {own!r} may import only "
            f"{sorted(n for n in RANK if RANK[n] <= RANK[own])}"
        )
        if RANK[own] == 0 and target != own:
            assert BASE_ORDER[target] < BASE_ORDER[own], f"{path.name}:{line}: {own} may not import {module}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rule above can fail: a store module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from saev_core.train import trainer\n")
    [(line, module)] = imports_of(bad)
    assert (line, layer_of(module)) == (2, "train") and RANK["train"] > RANK["store"]


def test_the_pipeline_file_reader_imports_no_torch():
    """Dagster reads the pipeline file at every code-server start and sensor tick: no torch there."""
    import subprocess
    import sys

    code = (
        "import sys; import saev_core.pipeline.file, saev_core.train.sweep; "
        "bad = [m for m in ('torch', 'open_clip', 'zarr') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docs_architecture_names_every_module():
    """docs/architecture.md lists every module with its job; a module added without a row fails here."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for path in modules():
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" or rel.parts[0] == "explorer":  # the explorer package has one row
            continue
        assert f"`{rel.as_posix()}`" in doc, f"docs/architecture.md has no row for saev_core/{rel.as_posix()}"
    for path in sorted((PACKAGE.parent / "saev_dagster").rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent / "saev_dagster")
        if rel.name != "__init__.py":
            assert f"`{rel.as_posix()}`" in doc, f"docs/architecture.md has no row for saev_dagster/{rel.as_posix()}"

"""The package's shape, as docs/ARCHITECTURE.md states it: small modules with one owner each, short
functions, no private names across modules, project imports at the top of a module (the two
modules that keep torch or onnxruntime out of a process are the exceptions), and subpackages whose
`__init__` only says what they own. The layering itself is import-linter's (`lint-imports`, in CI)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from .helpers import REPO

PACKAGE = REPO / "lsd_edge"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS = {"run_stage"}  # the stage loop reads best in one piece
# name -> why a module imports project code inside a function
LOCAL_PROJECT_IMPORTS = {
    "infer.py": "load_runner imports the runner a folder needs: ONNX use stays torch-free",
    "bench/worker.py": "a bench row imports only its backend, so its memory is that backend's alone",
    "cli/deploy_commands.py": "`lsd-edge demo` imports gradio (through the page), `lsd-edge export` the ONNX "
    "libraries, only when they run: `lsd-edge distill` starts without them",
}
# external packages a module may import inside a function: heavy, and needed by one path only
LOCAL_EXTERNAL_IMPORTS = {"matplotlib", "onnxruntime", "pynvml", "llama_cpp", "deepspeed", "selenium"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def body_lines(node: ast.FunctionDef) -> int:
    """Lines of a function after its signature and docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] or body
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", modules(), ids=name)
def test_module_is_small_and_documented(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name(path)}: split it by concern"
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"{name(path)}: say what the module owns in its docstring"
    if path.name == "__init__.py" and path.parent != PACKAGE:
        assert len(tree.body) == 1, f"{name(path)}: a subpackage's __init__ holds its docstring only"


@pytest.mark.parametrize("path", modules(), ids=name)
def test_functions_are_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [
        f"{node.name} ({body_lines(node)} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name not in LONG_FUNCTIONS
        and body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name(path)}: {', '.join(long)}"


@pytest.mark.parametrize("path", modules(), ids=name)
def test_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = [
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lsd_edge")
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, f"{name(path)} imports private names of other modules: {private}"
    local_project, local_external = [], []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                if m.startswith("lsd_edge"):
                    local_project.append(m)
                elif m.split(".")[0] not in LOCAL_EXTERNAL_IMPORTS:
                    local_external.append(m)
    if name(path) not in LOCAL_PROJECT_IMPORTS:
        assert not local_project, f"{name(path)}: import {local_project} at the top of the module"
    assert not local_external, f"{name(path)}: import {local_external} at the top of the module"


def test_the_demo_launcher_is_not_a_package():
    """`demo/` at the top is the Spaces-style app, not a package that would shadow another `demo`."""
    assert (REPO / "demo" / "app.py").is_file()
    assert not (REPO / "demo" / "__init__.py").exists()
    assert 'include = ["lsd_edge*"]' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def owner_table() -> dict[str, str]:
    """docs/ARCHITECTURE.md's "Who owns what" rows: first cell (a folder or a module) -> what it owns."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Who owns what", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_owner_table_names_every_module_and_only_modules_that_exist():
    """Each package folder has a row naming each of its modules in backticks, and each top-level
    module (but the entry point) a row of its own: a module added, moved or removed fails here
    until the table says who owns it."""
    rows = owner_table()
    folders: dict[str, set[str]] = {}
    for path in modules():
        rel = name(path)
        if path.name == "__init__.py" or rel == "__main__.py":
            continue
        if path.parent == PACKAGE:
            assert rel in rows, f"docs/ARCHITECTURE.md: no owner row for {rel}"
        else:
            folders.setdefault(path.parent.relative_to(PACKAGE).as_posix() + "/", set()).add(path.stem)
    assert set(folders) <= set(rows), f"folders without a row: {sorted(set(folders) - set(rows))}"
    for folder, stems in folders.items():
        named = {n for n in re.findall(r"`([a-z_]+)`", rows[folder])}
        missing = stems - named
        assert not missing, f"docs/ARCHITECTURE.md, row {folder}: modules not named: {sorted(missing)}"
    gone = [k for k in rows if not (PACKAGE / k).exists()]
    assert not gone, f"docs/ARCHITECTURE.md names what is not in the package: {gone}"


def contract_layers() -> dict[str, set[str]]:
    """Each import-linter layers contract's container -> the module names its layers list."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for c in config["tool"]["importlinter"]["contracts"]:
        if c["type"] != "layers":
            continue
        names = {n.strip() for layer in c["layers"] for n in layer.split("|")}
        for container in c.get("containers", [""]):
            out[container] = names
    return out


def test_every_module_is_under_an_import_contract():
    """Every module of a folder whose imports a layers contract orders is in one of its layers, and
    the top package's layers name every top-level folder and module: nothing escapes the layering."""
    layers = contract_layers()
    top = layers.pop("")
    for path in modules():
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() in ("__init__.py", "__main__.py"):
            continue
        assert f"lsd_edge.{rel.parts[0].removesuffix('.py')}" in top, (
            f"{name(path)}: in no layer of the package"
        )
        parent = "lsd_edge." + ".".join(rel.parts[:-1])
        if parent in layers:
            mod = rel.stem if path.name != "__init__.py" else None
            assert mod is None or mod in layers[parent], f"{name(path)}: in no layer of {parent}'s contract"
    for package in {p.parent for p in modules() if p.name == "__init__.py" and p.parent != PACKAGE}:
        dotted = "lsd_edge." + package.relative_to(PACKAGE).as_posix().replace("/", ".")
        if len(list(package.glob("*.py"))) > 2:  # __init__ and two modules or more
            assert dotted in layers, f"{dotted}: a folder of several modules with no layers contract"

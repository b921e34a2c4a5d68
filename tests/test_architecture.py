"""The package's shape, as docs/ARCHITECTURE.md states it: small modules with one owner each, short
functions, no private names across modules, project imports at the top of a module (the two
modules that keep torch or onnxruntime out of a process are the exceptions), and subpackages whose
`__init__` only says what they own. The layering itself is import-linter's (`lint-imports`, in CI)."""

from __future__ import annotations

import ast
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
    "cli/deploy_commands.py": "`lsd-edge demo` imports gradio (through the page) only when it runs",
}
# external packages a module may import inside a function: heavy, and needed by one path only
LOCAL_EXTERNAL_IMPORTS = {"matplotlib", "onnxruntime", "pynvml", "llama_cpp", "deepspeed"}


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

"""The shape of the code: which package may import which, and how wide a function may be."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mtrec", "pipelines")
MAX_PARAMS = 8


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module `path` imports, anywhere in it (also inside functions), as dotted names."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_imports_go_one_way_between_the_packages():
    """pipelines may import mtrec; nothing in mtrec imports pipelines (not even lazily)."""
    offenders = [
        f"{m} imports {i}"
        for m, p in _modules().items()
        if m.startswith("mtrec")
        for i in _imports(p, m)
        if i == "pipelines" or i.startswith("pipelines.")
    ]
    assert not offenders, offenders


@pytest.mark.slow  # a fresh interpreter per package
@pytest.mark.parametrize("package", ["mtrec.models", "mtrec.data"])
def test_models_and_data_import_neither_ray_mlflow_nor_the_run_spec(package):
    """Models and data code read the model spec only; Ray, MLflow and the run spec stay out."""
    banned = ("ray", "mlflow", "mtrec.config", "mtrec.jobs", "mtrec.tracking", "mtrec.cli")
    offenders = [
        f"{m} imports {i}"
        for m, p in _modules().items()
        if m == package or m.startswith(package + ".")
        for i in _imports(p, m)
        if any(i == b or i.startswith(b + ".") for b in banned)
    ]
    assert not offenders, offenders
    # and transitively, at run time: importing every module of the package loads none of them
    names = [m for m in _modules() if m == package or m.startswith(package + ".")]
    code = (
        f"import importlib, sys\nfor m in {names!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in {banned!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert res.stdout.strip() == "[]", res.stdout


def test_no_function_takes_more_than_eight_parameters():
    """State travels in typed objects (RunOptions, JobPlan, WorkerJob, ...), not long argument lists."""
    wide = []
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
                if len(params) > MAX_PARAMS:
                    wide.append(f"{m}.{node.name}: {len(params)} parameters")
    assert not wide, wide

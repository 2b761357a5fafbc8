"""dpnet.layers must not depend on MPI: no module under dpnet/layers may import mpi4py or
dpnet.parallel (absolutely, relatively, or through importlib), so the layers run and are
tested without an MPI installation."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dpnet.layers

LAYERS_DIR = Path(dpnet.layers.__file__).resolve().parent
REPO_ROOT = LAYERS_DIR.parent.parent
FORBIDDEN = ("mpi4py", "dpnet.parallel")


def is_forbidden(module):
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def resolve_relative(module, level, package):
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level > len(parts):
        raise ValueError(f"relative import beyond the top-level package in {package}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def forbidden_imports(source, package, filename="<source>"):
    """Every import in `source` (a module of `package`) that reaches mpi4py or
    dpnet.parallel, as a list of (line number, imported name)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(node.module, node.level, package)
            # `from dpnet import parallel` imports the submodule dpnet.parallel
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found.extend((node.lineno, name) for name in names if is_forbidden(name))
    return found


def package_of(path):
    """Dotted package a module file belongs to, e.g. dpnet/layers/conv.py -> dpnet.layers."""
    return ".".join(path.resolve().parent.relative_to(REPO_ROOT).parts)


LAYER_FILES = sorted(LAYERS_DIR.rglob("*.py"))


def test_layer_files_are_found():
    names = {p.name for p in LAYER_FILES}
    assert {"__init__.py", "conv.py", "batchnorm.py", "pool.py"} <= names


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: str(p.relative_to(LAYERS_DIR)))
def test_layer_module_does_not_import_mpi(path):
    hits = forbidden_imports(path.read_text(), package_of(path), str(path))
    assert not hits, f"{path.relative_to(REPO_ROOT)} imports {hits}"


@pytest.mark.parametrize("source", [
    "from mpi4py import MPI",
    "import mpi4py",
    "import numpy as np\nimport mpi4py.MPI as MPI",
    "from ..parallel import allreduce",
    "from .. import parallel",
    "from ..parallel.comm import Comm",
    "import dpnet.parallel",
    "from dpnet import parallel",
    "from dpnet.parallel import comm as c",
    "def f():\n    from mpi4py import MPI\n    return MPI",
    "import importlib\nMPI = importlib.import_module('mpi4py.MPI')",
    "mod = __import__('dpnet.parallel')",
])
def test_scanner_detects_forbidden_imports(source):
    """Negative controls: the scanner must flag each of these in a dpnet.layers module."""
    assert forbidden_imports(source, "dpnet.layers")


@pytest.mark.parametrize("source", [
    "import numpy as np\nfrom .conv import conv_forward\nfrom ._validate import require_ndim",
    "from . import pool",
    "import mpi4pyx",  # a different package that merely shares the prefix
    "from .parallel_utils import x",  # dpnet.layers.parallel_utils, not dpnet.parallel
])
def test_scanner_accepts_clean_imports(source):
    assert forbidden_imports(source, "dpnet.layers") == []


def test_importing_layers_loads_no_mpi():
    """At run time too: a fresh interpreter importing dpnet.layers loads neither module."""
    code = ("import sys, dpnet.layers; "
            "print(sorted(m for m in sys.modules if m == 'mpi4py' or m.startswith('mpi4py.') "
            "or m == 'dpnet.parallel' or m.startswith('dpnet.parallel.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout

"""The package's imports go one way: public losses -> distributed -> ops -> reference, with leaf
modules (argument checks, backends, the CUDA emulation, autocast, once-differentiable) importable from
anywhere.

Pure `ast` over the sources (nothing is imported), so a cycle cannot hide behind a function-level
import, and a layer cannot reach into another module's private names. The Triton kernel modules
(./triton_kernels, installed as lossforge_kernels.triton_kernels) import only triton, torch and each
other: Triton is optional, and the package loads them lazily by name (ops/_library.py).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "lossforge_kernels"
KERNELS = f"{PACKAGE}.triton_kernels"

# Rank of each layer: a module may import its own rank or lower. Leaves import only leaves.
LEAF, REFERENCE, OPS, DISTRIBUTED, PUBLIC = range(5)
LEAVES = {f"{PACKAGE}.{name}" for name in ("_checks", "_backends", "_cuda_emulation", "_autocast", "_once_differentiable")}
PREFIX_LAYERS = [  # longest first
    (f"{PACKAGE}.losses", PUBLIC), (f"{PACKAGE}.functional", PUBLIC), (f"{PACKAGE}.modules", PUBLIC),
    (f"{PACKAGE}.integrations", PUBLIC),
    (f"{PACKAGE}.distributed", DISTRIBUTED), (f"{PACKAGE}.ops", OPS), (f"{PACKAGE}.reference", REFERENCE),
]

# (importing module, imported module) -> why a function-level import is needed. Keep it short.
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}


def layer(module: str) -> int:
    if module in LEAVES:
        return LEAF
    if module == PACKAGE:
        return PUBLIC
    for prefix, rank in PREFIX_LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def _module_name(path: pathlib.Path, top: pathlib.Path, package: str) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def sources() -> dict[str, tuple[pathlib.Path, bool]]:
    """Module name -> (file, is a package __init__), for the package and the Triton kernels."""
    found = {}
    for top, package in ((ROOT / PACKAGE, PACKAGE), (ROOT / "triton_kernels", KERNELS)):
        for path in sorted(top.rglob("*.py")):
            if package == PACKAGE and "triton_kernels" in path.relative_to(top).parts:
                continue  # the development link to ./triton_kernels
            found[_module_name(path, top, package)] = (path, path.name == "__init__.py")
    return found


def _in_function(tree: ast.AST):
    """(import node, whether it sits inside a function) for every import in the tree."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, inside
            yield from walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def imports(module: str, source: str, is_package: bool, known: set[str]):
    """(imported module, imported name or None, line, inside a function) for each package import.

    `from X import y` counts as an import of module X.y when that module exists, else of name y of X."""
    tree = ast.parse(source)
    for node, inside in _in_function(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield alias.name, None, node.lineno, inside
            continue
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                yield sub, None, node.lineno, inside
            else:
                yield base, alias.name, node.lineno, inside


def violations(files: dict[str, tuple[str, bool]]) -> dict[str, list[str]]:
    """Rule -> messages, for module name -> (source, is a package __init__)."""
    known = set(files)
    found = {"higher layer": [], "function level": [], "private name": [], "kernel module": []}
    for module, (source, is_package) in sorted(files.items()):
        kernel = module.startswith(KERNELS + ".") or module == KERNELS
        for target, name, line, inside in imports(module, source, is_package, known):
            where = f"{module}:{line} imports {target}" + (f".{name}" if name else "")
            target_kernel = target == KERNELS or target.startswith(KERNELS + ".")
            if kernel:
                if not target_kernel:
                    found["kernel module"].append(where)
                continue
            if target_kernel:
                if not inside:
                    found["kernel module"].append(where + " at module level (Triton is optional)")
                continue
            if layer(target) > layer(module):
                found["higher layer"].append(where)
            if inside and (module, target) not in FUNCTION_LEVEL_ALLOWED:
                found["function level"].append(where)
            if name is not None and name.startswith("_") and target != module:
                found["private name"].append(where)
    return found


@pytest.fixture(scope="module")
def found():
    return violations({m: (p.read_text(), pkg) for m, (p, pkg) in sources().items()})


def test_every_module_has_a_layer():
    names = set(sources())
    assert {f"{PACKAGE}.losses.cross_entropy", f"{PACKAGE}.ops.triplet", f"{KERNELS}.triplet"} <= names
    for module in names:
        if not module.startswith(KERNELS):
            layer(module)


def test_no_import_from_a_higher_layer(found):
    assert not found["higher layer"], "\n".join(found["higher layer"])


def test_no_function_level_import_of_a_package_module(found):
    assert not found["function level"], "\n".join(found["function level"])


def test_no_import_of_another_modules_private_name(found):
    assert not found["private name"], "\n".join(found["private name"])


def test_triton_kernel_modules_import_nothing_from_the_package(found):
    assert not found["kernel module"], "\n".join(found["kernel module"])


def test_allow_list_names_existing_modules():
    names = set(sources())
    for (module, target), reason in FUNCTION_LEVEL_ALLOWED.items():
        assert module in names and target in names and reason


def test_the_rules_catch_each_kind_of_violation():
    files = {
        f"{PACKAGE}._checks": ("", False),
        f"{PACKAGE}.losses": ("", True),
        f"{PACKAGE}.losses.a": ("from .. import _checks\nfrom ..ops.b import ok\n", False),
        f"{PACKAGE}.ops": ("", True),
        f"{PACKAGE}.ops.b": ("def f():\n    from ..losses.a import g\n", False),
        f"{PACKAGE}.reference": ("", True),
        f"{PACKAGE}.reference.c": ("import lossforge_kernels.ops.b\nfrom .d import _hidden\n", False),
        f"{PACKAGE}.reference.d": ("from . import c\n", False),
        f"{PACKAGE}.distributed": ("", True),
        f"{PACKAGE}.distributed.e": ("from ..triton_kernels import k\ndef f():\n    from ..triton_kernels import k\n",
                                     False),
        KERNELS: ("", True),
        f"{KERNELS}.k": ("from .j import x\nfrom lossforge_kernels._backends import y\n", False),
        f"{KERNELS}.j": ("", False),
    }
    got = violations(files)
    assert got["higher layer"] == [f"{PACKAGE}.ops.b:2 imports {PACKAGE}.losses.a.g",
                                   f"{PACKAGE}.reference.c:1 imports {PACKAGE}.ops.b"]
    assert got["function level"] == [f"{PACKAGE}.ops.b:2 imports {PACKAGE}.losses.a.g"]
    assert got["private name"] == [f"{PACKAGE}.reference.c:2 imports {PACKAGE}.reference.d._hidden"]
    assert got["kernel module"] == [
        f"{PACKAGE}.distributed.e:1 imports {KERNELS}.k at module level (Triton is optional)",
        f"{KERNELS}.k:2 imports {PACKAGE}._backends.y"]

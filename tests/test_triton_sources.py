"""Static checks of the Triton sources that the interpreter cannot make: a @triton.jit function may
read only constexpr globals (and other jit functions and modules) when it is compiled for a GPU."""
import importlib
import inspect
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import lossforge_kernels.triton_kernels as package  # noqa: E402

# Under TRITON_INTERPRET=1, @triton.jit makes an InterpretedFunction instead of a JITFunction.
JIT_TYPES = tuple(t for t in (getattr(triton.runtime.jit, "JITFunction", None),
                              getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)) if t)
MODULES = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _names(code):
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _jit_functions(module):
    for name, value in vars(module).items():
        if isinstance(value, JIT_TYPES) and value.fn.__module__ == module.__name__:
            yield name, value


def _allowed(value):
    return isinstance(value, (tl.constexpr, types.ModuleType) + JIT_TYPES) or \
        inspect.isbuiltin(value) or value in (float, int, bool, range, min, max)


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__.rsplit(".", 1)[-1] for m in MODULES])
def test_jit_functions_read_only_constexpr_globals(module):
    bad = []
    for name, fn in _jit_functions(module):
        scope = fn.fn.__globals__
        for used in set(_names(fn.fn.__code__)):
            if used in scope and not _allowed(scope[used]):
                bad.append(f"{name} reads {used} = {scope[used]!r}")
    assert not bad, "non-constexpr globals in jit code (a GPU compile refuses them): " + "; ".join(bad)


def test_the_check_sees_every_module():
    assert all(list(_jit_functions(m)) for m in MODULES), [m.__name__ for m in MODULES if not list(_jit_functions(m))]

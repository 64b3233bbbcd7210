"""The public loss families, one module per family stem, found by walking this package.

Each family module declares its public API at its end: `FUNCTIONS` (the loss functions) and
`MODULES` (their nn.Module wrappers). functional.py, modules.py and the package export what the
families declare, so adding a family edits no central list. Private (`_`) modules are not families.
"""
import importlib
import pkgutil

FAMILIES = tuple(importlib.import_module(f"{__name__}.{info.name}")
                 for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
                 if not info.name.startswith("_"))


def _exports(kind: str) -> dict:
    """Name -> object over every family's `kind` declaration; a name two families declare is refused."""
    found = {}
    for family in FAMILIES:
        if not hasattr(family, kind):
            raise ImportError(f"{family.__name__} declares no {kind}: a family module ends with its "
                              "FUNCTIONS = (...) and MODULES = (...)")
        for obj in getattr(family, kind):
            if obj.__name__ in found:
                raise ImportError(f"{family.__name__}.{kind}: {obj.__name__} is already exported by another family")
            found[obj.__name__] = obj
    return found


FUNCTIONS = _exports("FUNCTIONS")
MODULES = _exports("MODULES")

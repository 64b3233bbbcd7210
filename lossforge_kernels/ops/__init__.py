"""torch.library ops of the `lossforge` namespace, one module per loss family with kernels.

Every public module here is imported, found by walking the package, so each family's ops exist
once the package is imported; private (`_`) modules are imported by the modules that use them.
"""
import importlib
import pkgutil


def _import_public_modules() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_public_modules()

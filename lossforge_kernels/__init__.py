"""lossforge_kernels: fused loss kernels for PyTorch.

    import lossforge_kernels as lf
    loss = lf.cross_entropy(logits, target, label_smoothing=0.1)

Every loss takes backend="auto" | "cuda" | "triton" | "reference" (LOSSFORGE_BACKEND overrides
"auto"); lf.available_backends() says what runs here and why not.
"""
import torch as _torch

from ._backends import major_minor as _major_minor

# aten's out_dtype products (mm / addmm .dtype_out, called by the CUDA extension) are new in torch 2.8;
# pyproject.toml states the same minimum.
_MIN_TORCH = (2, 8)


def _require_torch(version: str) -> None:
    """A clear ImportError on a torch older than _MIN_TORCH (pre-releases of the minimum pass)."""
    if _major_minor(version) < _MIN_TORCH:
        need = ".".join(map(str, _MIN_TORCH))
        raise ImportError(f"lossforge_kernels needs torch >= {need}, found torch {version}: "
                          f"upgrade it (pip install 'torch>={need}')")


_require_torch(_torch.__version__)

from . import ops as _ops  # noqa: F401  (defines the torch.library ops before any extension loads)
from ._backends import BackendInfo, BackendUnavailableError, available_backends
from .functional import *  # noqa: F401,F403  (every family's functions, found by walking losses/)
from .modules import *  # noqa: F401,F403  (every family's nn.Modules)
from . import functional, modules

__version__ = "0.1.0"
__all__ = ["available_backends", "BackendInfo", "BackendUnavailableError", *functional.__all__, *modules.__all__]

"""torch.autocast for the losses: every backend computes the loss of the inputs as autocast rounds them.

Under autocast a matrix product takes its float operands in the autocast dtype, and torch's own
losses run in float32 and return float32. The losses follow both rules on every backend:

- the operands of their products (linear cross-entropy's input, weight and bias; the contrastive
  embeddings; triplet embeddings) are rounded to the autocast dtype, as autocast would round them;
- everything else is computed in float32 from those values and the loss is float32 (float64 stays
  float64: autocast leaves it alone);
- the call itself runs with autocast off, so that no product inside a reference is rounded again.

The kernels take the rounded operands as they take half-precision input outside autocast; the
reference takes the same rounded values held in float32, so the backends agree.
"""
from __future__ import annotations

import contextlib

import torch

F32 = torch.float32
_CAST = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast recasts


def _enabled(device: str) -> bool:
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # meta has none


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives products on t's device, or None outside autocast (or for float64 t)."""
    device = t.device.type
    if t.dtype not in _CAST or not _enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def round_operand(x: torch.Tensor | None, dtype: torch.dtype | None, *, reference: bool):
    """x as autocast hands it to a product: in `dtype` for the kernels, those rounded values in
    float32 for the reference. Unchanged outside autocast (dtype None) and for non-float or float64 x."""
    if x is None or dtype is None or x.dtype not in _CAST:
        return x
    x = x.to(dtype)
    return x.to(F32) if reference else x


def widen(x: torch.Tensor | None, dtype: torch.dtype | None):
    """A non-product float input for the reference under autocast: float32, as autocast gives torch's losses."""
    if x is None or dtype is None or x.dtype not in _CAST:
        return x
    return x.to(F32)


def loss_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The loss's dtype under autocast (float32), None outside it (the input's, as usual)."""
    return None if dtype is None else F32


def off(t: torch.Tensor):
    """Autocast off on t's device for the rest of a call (a no-op context outside autocast)."""
    device = t.device.type
    if not _enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)

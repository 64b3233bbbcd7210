"""Pieces of the kernel ops' contract checks that every family uses: each refusal names the op and
the argument (ValueError, or TypeError for a wrong dtype)."""
from __future__ import annotations

import torch

F32 = torch.float32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, message: str, exc: type = ValueError):
    raise exc(f"{op}: {message}")


def require_like(op: str, name: str, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """`t` contiguous with `like`'s shape, on its device, and of `dtype` when given."""
    if t.shape != like.shape or not t.is_contiguous() or t.device != like.device:
        fail(op, f"{name} must be contiguous with shape {tuple(like.shape)} on {like.device}, got shape "
                 f"{tuple(t.shape)}, strides {t.stride()} on {t.device}")
    if dtype is not None and t.dtype != dtype:
        fail(op, f"{name} must have dtype {dtype}, got {t.dtype}")


def require_tensor(op: str, name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor, dtype=F32) -> None:
    """`t` a contiguous `dtype` tensor of exactly `shape`, on `like`'s device."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous() or t.device != like.device:
        fail(op, f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {like.device}, got shape "
                 f"{tuple(t.shape)}, dtype {t.dtype}, strides {t.stride()} on {t.device}")


def require_choice(op: str, name: str, value: int, choices) -> None:
    """`value` one of `choices` (members of an IntEnum), as the int the kernel ops take."""
    if value not in {int(c) for c in choices}:
        got = int(value) if isinstance(value, int) else repr(value)  # an enum member as the int the op takes
        fail(op, f"{name} must be one of {', '.join(f'{int(c)} ({c.name})' for c in choices)}, got {got}")


def require_grad_factor(op: str, grad_factor: torch.Tensor | None, grad, like: torch.Tensor) -> None:
    """A forward op's gradient factor: a 0-dim fp32 tensor on `like`'s device, given exactly with grad."""
    if (grad_factor is None) != (grad is None):
        fail(op, f"grad_factor must be given exactly when grad is (grad is {'not ' if grad is None else ''}None)")
    if grad_factor is None:
        return
    if grad_factor.dtype != F32:
        fail(op, f"grad_factor must have dtype torch.float32, got {grad_factor.dtype}", TypeError)
    if grad_factor.dim() != 0 or grad_factor.device != like.device:
        fail(op, f"grad_factor must be a 0-dim tensor on {like.device}, got shape {tuple(grad_factor.shape)} on "
                 f"{grad_factor.device}")

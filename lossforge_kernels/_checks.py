"""Argument checks shared by every loss: each error names the argument, its value and what was expected.

Only metadata is inspected here (shapes, dtypes, devices, Python scalars), so nothing synchronises
with the device; value checks that would need a sync run only where they are free (CPU tensors) or
when LOSSFORGE_CHECK_INPUTS=1 asks for them.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def eager_value_checks(t: torch.Tensor) -> bool:
    """Whether to run value checks that read tensor contents (free on CPU, a sync on a GPU)."""
    if torch.compiler.is_compiling():  # a data-dependent branch would break the graph
        return False
    if t.device.type == "cpu":
        return True
    return os.environ.get("LOSSFORGE_CHECK_INPUTS", "0") not in ("", "0")


def check_target_range(target, num_classes, ignore_index):
    """IndexError for a class index out of range, where reading the targets is free (eager_value_checks)."""
    if target.numel() == 0 or not eager_value_checks(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(f"target contains class index {value}, out of range [0, {num_classes}) "
                         f"and not ignore_index={ignore_index}")


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_tensor(name: str, t, *, ndim=None, min_ndim=None, float_only=False, integer_only=False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if integer_only and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")


def _is_number(value, kind) -> bool:
    """A Python or NumPy number of `kind` (numbers.Real or numbers.Integral); bools are not numbers here."""
    return isinstance(value, kind) and not isinstance(value, bool)


def check_float(name: str, value, *, low=None, high=None, low_open=False, allow_none=False, finite=False):
    if value is None and allow_none:
        return None
    if not _is_number(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    # comparisons, not math.isnan/isinf: under torch.compile(dynamic=True) an option may arrive as a
    # symbolic float, which comparisons guard on and math's functions cannot take
    bad = value != value or (finite and abs(value) == math.inf)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value > high
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        what = " and finite" if finite else ""
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}]{what}, got {value!r}")
    return value


INT64_RANGE = (-2**63, 2**63 - 1)


def check_int(name: str, value) -> int:
    """A Python or NumPy integer that fits in int64 (what the kernels take)."""
    if not _is_number(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{name} must fit in int64 [{INT64_RANGE[0]}, {INT64_RANGE[1]}], got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_rows_and_labels(name: str, rows, labels) -> None:
    """rows (B, D) float and labels (B,) integer on the same device."""
    check_tensor(name, rows, ndim=2, float_only=True)
    check_tensor("labels", labels, ndim=1, integer_only=True)
    if labels.shape[0] != rows.shape[0]:
        raise ValueError(f"labels must have shape ({rows.shape[0]},), one label per row of {name} "
                         f"{tuple(rows.shape)}, got {tuple(labels.shape)}")
    check_same_device(name, rows, labels=labels)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_process_group(process_group) -> None:
    """None, or a torch.distributed process group (dist.group.WORLD included)."""
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group: this build of torch has no torch.distributed")
    if process_group is not dist.group.WORLD and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")

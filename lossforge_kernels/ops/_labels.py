"""Per-row facts about integer labels that the kernel paths need, without a B x B mask or a host sync."""
from __future__ import annotations

import torch


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """(B,) int64: how many rows share each row's label (itself included), from one sort."""
    ordered = torch.sort(labels).values
    return torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)

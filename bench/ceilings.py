"""The copy rate of this device, measured in the same run: the ceiling the %-of-copy column divides by.

A copy reads and writes every byte once, the same traffic pattern as a loss that reads its logits
and writes their gradient, so it is the rate a memory-bound loss kernel can hope to approach.
"""
from __future__ import annotations

import statistics
import time

import torch

GPU_COPY_BYTES = 1 << 30   # far beyond any L2, so the copy streams from device memory
CPU_COPY_BYTES = 64 << 20  # modest: beyond most last-level caches, quick on a small CI machine


def copy_bytes_per_s(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Median rate of dst.copy_(src) over `reps` copies, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults, first-touch allocation
    seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(seconds)

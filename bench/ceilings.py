"""This device's ceilings, measured in the same run: the copy rate the %-of-copy column divides by,
and the matrix-product rate for suites bound by matrix products.

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
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, reps)


def median_seconds(run, device: torch.device, reps: int) -> float:
    """Median time of run() after one warm-up call (page faults, first-touch, kernel selection),
    timed with CUDA events on a GPU and perf_counter on a CPU."""
    run()
    seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def matmul_flops_per_s(device: torch.device, n: int | None = None, reps: int = 10) -> float:
    """Median rate of an n x n x n matrix product in bf16 on a GPU (float32 on CPU), counting 2 n^3 FLOPs:
    the ceiling the %-of-matmul column of suites bound by matrix products divides by."""
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b, out=out), device, reps)

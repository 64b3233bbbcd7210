"""Sweep of the cross-entropy kernels' launch plans, for choosing their defaults (plan_rows in
csrc/row_plan.h, _launch_config in triton_kernels/cross_entropy.py).

    python -m bench.sweep_rows [--shapes 8192x32000,8192x128256,4096x256000] [--dtype bfloat16]
                               [--backend cuda] [--settings "threads=256;prefetch_kb=64,threads=1024"]

For each setting of the tuning knobs (cuda: LOSSFORGE_ROW_THREADS, LOSSFORGE_ROW_L2_SHARE,
LOSSFORGE_ROW_CACHE, LOSSFORGE_ROW_PREFETCH_KB; triton: LOSSFORGE_TRITON_CHUNK,
LOSSFORGE_TRITON_CHUNK_WARPS; read at every launch, a setting names them without the prefix) it
times mean cross-entropy fwd+bwd and the forward without grad on that backend, the way the bench
times a row (CUDA-graph replay, L2 flushed before each replay), and prints the median ms and the %
of the copy rate measured in the same run. A tuning tool: its numbers are not the project's
results table (that is `python -m bench`).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from . import ceilings, harness

PREFIX = {"cuda": "LOSSFORGE_ROW_", "triton": "LOSSFORGE_TRITON_"}
KNOBS = {"cuda": ("THREADS", "L2_SHARE", "CACHE", "PREFETCH_KB"), "triton": ("CHUNK", "CHUNK_WARPS")}
DEFAULT_SETTINGS = {
    "cuda": ";threads=128;threads=256;threads=512;threads=1024;l2_share=1.0;cache=0;prefetch_kb=64;prefetch_kb=256",
    "triton": ";chunk=4096;chunk=16384;chunk=16384,chunk_warps=16;chunk_warps=16",
}


def parse_settings(text, backend="cuda"):
    """'threads=256,prefetch_kb=64;cache=0' -> [{LOSSFORGE_ROW_THREADS: '256', ...}, {...}]; '' is the default."""
    out = []
    for item in text.split(";"):
        knobs = {}
        for pair in filter(None, item.split(",")):
            key, val = pair.split("=")
            key = key.strip().upper()
            if key not in KNOBS[backend]:
                known = ", ".join(k.lower() for k in KNOBS[backend])
                raise SystemExit(f"unknown {backend} knob {key.lower()!r}; known: {known}")
            knobs[PREFIX[backend] + key] = val.strip()
        out.append(knobs)
    return out


def _steps(x, t, backend):
    import lossforge_kernels as lf

    def fwd_bwd():
        lf.cross_entropy(x, t, backend=backend).backward()

    def fwd():
        with torch.no_grad():
            lf.cross_entropy(x, t, backend=backend)

    return {"fwd+bwd": (fwd_bwd, 2), "fwd": (fwd, 1)}  # step, elements' sizes moved per logit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep_rows", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x32000,8192x128256,4096x256000")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backend", default="cuda", choices=tuple(KNOBS))
    p.add_argument("--settings", default=None,
                   help="';'-separated knob settings, each ','-separated key=value (empty: the defaults)")
    args = p.parse_args(argv)
    import lossforge_kernels as lf

    if not torch.cuda.is_available() or not lf.available_backends()[args.backend].available:
        print(f"needs a CUDA GPU and the {args.backend} backend", file=sys.stderr)
        return 2
    sweep = parse_settings(DEFAULT_SETTINGS[args.backend] if args.settings is None else args.settings, args.backend)
    names = [PREFIX[args.backend] + k for k in KNOBS[args.backend]]
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    settings = harness.Settings(device, "gpu", warmup=2, reps=10, budget_ms=300.0)
    copy = ceilings.copy_bytes_per_s(device)
    env = harness.environment(device)
    print(f"{env['device']}; torch {env['torch_version']}; copy {copy / 1e12:.3g} TB/s; {args.dtype}; "
          f"{args.backend}")
    saved = {k: os.environ.get(k) for k in names}
    try:
        for shape in args.shapes.split(","):
            n, v = (int(s) for s in shape.split("x"))
            x = (torch.randn(n, v, device=device, dtype=dtype) * 2).requires_grad_(True)
            t = torch.randint(0, v, (n,), device=device)
            for mode, (step, per_logit) in _steps(x, t, args.backend).items():
                cells = []
                for knobs in sweep:
                    for k in names:
                        os.environ.pop(k, None)
                    os.environ.update(knobs)

                    def reset(clear_grad=True, x=x):
                        if clear_grad:
                            x.grad = None

                    times, _ = harness._time_gpu(step, reset, settings)
                    ms = float(np.median(times))
                    pct = 100 * n * v * per_logit * x.element_size() / (ms / 1e3) / copy
                    label = ",".join(f"{k[len(PREFIX[args.backend]):].lower()}={val}"
                                     for k, val in knobs.items()) or "default"
                    cells.append(f"{label} {ms:.4f} ms ({pct:.0f}%)")
                print(f"{shape} {mode}: " + " | ".join(cells), flush=True)
            del x, t
            torch.cuda.empty_cache()
    finally:
        for k, val in saved.items():
            os.environ.pop(k, None)
            if val is not None:
                os.environ[k] = val
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every loss on several processes: a torchrun example that checks each against one process on the
whole batch and times its fwd+bwd.

    torchrun --nproc-per-node 2 -m bench.distributed                     # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 8 -m bench.distributed --rows 8192 --vocab 128256 --dim 4096 --batch 65536

Each rank makes the same random inputs from one seed and keeps its part: its slice of the
vocabulary (cross_entropy, linear_cross_entropy) or of the batch (info_nce, supcon_loss,
siglip_loss, triplet_loss). Rank 0 prints, per loss, the largest relative error of the loss and of
this rank's gradients against one process (skipped when the full problem would not fit one
process: --no-check) and the median fwd+bwd time over --reps steps, with the group's backend.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _parse(argv):
    p = argparse.ArgumentParser(prog="torchrun ... -m bench.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256, help="rows of the cross-entropy losses (N)")
    p.add_argument("--vocab", type=int, default=4099, help="classes, split over the ranks (V)")
    p.add_argument("--dim", type=int, default=64, help="feature size of the linear head and the embeddings (D)")
    p.add_argument("--batch", type=int, default=512, help="global batch of the contrastive and triplet losses (B)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-check", action="store_true", help="skip the one-process comparison (large shapes)")
    return p.parse_args(argv)


def _part(n, world, rank):
    """Rank's [start, stop) of n items split as evenly as possible."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _timed(step, reps, device):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cases(args, rank, world, device, dtype):
    """(name, sharded step -> (loss, [this rank's leaves]), one-process step -> (loss, [the same leaves' rows]))."""
    import lossforge_kernels as lf

    g = torch.Generator().manual_seed(0)
    n, v, d, b = args.rows, args.vocab, args.dim, args.batch
    logits = torch.randn(n, v, generator=g) * 2
    target = torch.randint(0, v, (n,), generator=g)
    x, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    q, k = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    labels = torch.randint(0, max(2, b // 4), (b,), generator=g)
    vs, ve = _part(v, world, rank)
    bs, be = _part(b, world, rank)
    pg = dist.group.WORLD

    def leaf(t):
        return t.to(device=device, dtype=dtype).clone().requires_grad_(True)

    def ce():
        z = leaf(logits[:, vs:ve])
        return lf.cross_entropy(z, target.to(device), label_smoothing=0.1, process_group=pg), [z]

    def ce_ref():
        z = leaf(logits)
        return lf.cross_entropy(z, target.to(device), label_smoothing=0.1), [(z, slice(vs, ve), 1)]

    def lce():
        xs, ws = leaf(x), leaf(w[vs:ve])
        return lf.linear_cross_entropy(xs, ws, target.to(device), z_loss=1e-4, process_group=pg), [xs, ws]

    def lce_ref():
        xs, ws = leaf(x), leaf(w)
        return lf.linear_cross_entropy(xs, ws, target.to(device), z_loss=1e-4), [(xs, slice(None), 0),
                                                                                  (ws, slice(vs, ve), 0)]

    def pair(fn, **kw):
        def sharded():
            qs, ks = leaf(q[bs:be]), leaf(k[bs:be])
            return fn(qs, ks, process_group=pg, **kw), [qs, ks]

        def whole():
            qs, ks = leaf(q), leaf(k)
            return fn(qs, ks, **kw), [(qs, slice(bs, be), 0), (ks, slice(bs, be), 0)]
        return sharded, whole

    def labelled(fn, **kw):
        def sharded():
            f = leaf(q[bs:be])
            return fn(f, labels[bs:be].to(device), process_group=pg, **kw), [f]

        def whole():
            f = leaf(q)
            return fn(f, labels.to(device), **kw), [(f, slice(bs, be), 0)]
        return sharded, whole

    siglip = lambda qs, ks, **kw: lf.siglip_loss(qs, ks, 10.0, -10.0, **kw)  # noqa: E731
    return [("cross_entropy (vocab-parallel)", ce, ce_ref),
            ("linear_cross_entropy (vocab-parallel)", lce, lce_ref),
            ("info_nce (global batch)", *pair(lf.info_nce, temperature=0.1)),
            ("siglip_loss (global batch)", *pair(siglip)),
            ("supcon_loss (global batch)", *labelled(lf.supcon_loss, temperature=0.1)),
            ("triplet_loss batch_hard (global batch)", *labelled(lf.triplet_loss, margin=0.2))]


def main(argv=None) -> int:
    args = _parse(argv)
    if "RANK" not in os.environ:
        print("run under torchrun, e.g. torchrun --nproc-per-node 2 -m bench.distributed", file=sys.stderr)
        return 2
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        report(args, dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()
    return 0


def report(args, rank, world, device):
    dtype = getattr(torch, args.dtype)
    lines = []
    for name, sharded, whole in cases(args, rank, world, device, dtype):
        loss, leaves = sharded()
        loss.backward()
        err = float("nan")
        if not args.no_check:
            want, refs = whole()
            # the global-batch losses give each rank W times its rows' share of the gradient
            (want * (world if "global" in name else 1)).backward()
            err = max([_rel(loss, want)] + [_rel(mine.grad, ref.grad[rows] if dim == 0 else ref.grad[:, rows])
                                            for mine, (ref, rows, dim) in zip(leaves, refs)])

        def step():
            out, _ = sharded()
            out.backward()

        ms = _timed(step, args.reps, device)
        lines.append(f"{name:42s} rel err {err:9.2e}  fwd+bwd {ms:9.3f} ms")
    if rank == 0:
        print(f"{world} ranks, backend {dist.get_backend()}, {device.type}, {args.dtype}; N={args.rows} "
              f"V={args.vocab} D={args.dim} B={args.batch}")
        print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(main())

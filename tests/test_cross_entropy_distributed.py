"""Vocabulary-parallel cross-entropy and linear cross-entropy on 2 and 4 CPU processes (gloo): every
rank's loss and the gradient of its slice against one process on the whole vocabulary, every
option, uneven and explicit slices, and ranks that disagree."""
import pytest
import torch

import lossforge_kernels as lf
from tests import distributed

REDUCTIONS = ("none", "mean", "sum")
CE_CASES = (
    dict(),
    dict(label_smoothing=0.2),
    dict(weight="slice", label_smoothing=0.1),
    dict(weight="full"),
    dict(z_loss=1e-2, softcap=4.0),
    dict(focal_gamma=2.0, focal_alpha=0.3),
    dict(focal_gamma=0.5, focal_alpha="slice", weight="full", label_smoothing=0.1, z_loss=1e-3, softcap=6.0),
    dict(soft=True, label_smoothing=0.1, weight="slice", z_loss=1e-3),
    dict(vocab_start="explicit", label_smoothing=0.1),
    dict(all_ignored=True),
)


def _slices(world, total):
    """Uneven contiguous slices in rank order: (start, size) per rank."""
    sizes = [total // world + (1 if r < total % world else 0) for r in range(world)]
    sizes.reverse()  # the last ranks get the larger slices
    starts = [sum(sizes[:r]) for r in range(world)]
    return list(zip(starts, sizes))


def _vector(kind, full, start, size):
    if kind is None:
        return None
    return full if kind == "full" else full[start:start + size]


def _ce_worker(rank, world):
    import torch.distributed as dist

    total = 7 * world + 3
    failures = []
    for i, case in enumerate(CE_CASES):
        for reduction in REDUCTIONS:
            opts = dict(case)
            g = torch.Generator().manual_seed(100 + i)
            n = 9
            x = torch.randn(n, total, generator=g, dtype=torch.float64) * 3
            soft = opts.pop("soft", False)
            t = torch.softmax(torch.randn(n, total, generator=g, dtype=torch.float64), 1) if soft else \
                torch.randint(0, total, (n,), generator=g)
            if not soft:
                t[::4] = -100
                if opts.pop("all_ignored", False):
                    t[:] = -100
            w_full = torch.rand(total, generator=g, dtype=torch.float64) + 0.5
            a_full = torch.rand(total, generator=g, dtype=torch.float64)
            go = torch.rand(n if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
            slices = _slices(world, total)
            if opts.pop("vocab_start", None) == "explicit":  # the slices in reverse rank order
                sizes = [size for _, size in slices][::-1]
                slices = [(sum(sizes[:world - 1 - r]), sizes[world - 1 - r]) for r in range(world)]
                opts["vocab_start"] = slices[rank][0]
            start, size = slices[rank]
            weight, alpha = opts.pop("weight", None), opts.get("focal_alpha")
            if isinstance(alpha, str):
                opts["focal_alpha"] = _vector(alpha, a_full, start, size)
            local = x[:, start:start + size].clone().requires_grad_(True)
            local_t = t[:, start:start + size] if soft else t
            loss = lf.cross_entropy(local, local_t, _vector(weight, w_full, start, size), reduction=reduction,
                                    process_group=dist.group.WORLD, **opts)
            loss.backward(go)
            ref_opts = {k: v for k, v in opts.items() if k != "vocab_start"}
            if isinstance(alpha, str):
                ref_opts["focal_alpha"] = a_full
            full = x.clone().requires_grad_(True)
            want = lf.cross_entropy(full, t, w_full if weight else None, reduction=reduction, backend="reference",
                                    **ref_opts)
            want.backward(go)
            ok_loss = torch.allclose(loss, want, rtol=1e-10, atol=1e-12, equal_nan=True)
            ok_grad = torch.allclose(local.grad, full.grad[:, start:start + size], rtol=1e-9, atol=1e-12,
                                     equal_nan=True)
            if not (ok_loss and ok_grad):
                failures.append(f"{case} {reduction}: loss {loss} vs {want}; grad ok {ok_grad}")
    assert not failures, "\n".join(failures)


def _disagreement_worker(rank, world):
    import torch.distributed as dist

    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    messages = []
    for kwargs in (dict(rows=4 + rank), dict(smoothing=0.1 * rank), dict(start=0)):
        try:
            rows = kwargs.get("rows", 4)
            lf.cross_entropy(torch.randn(rows, 5, dtype=torch.float64), torch.zeros(rows, dtype=torch.long),
                             label_smoothing=kwargs.get("smoothing", 0.0), vocab_start=kwargs.get("start"),
                             process_group=dist.group.WORLD)
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    del x, t
    return messages


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_vocab_parallel_cross_entropy_matches_one_process(world):
    distributed.run(world, _ce_worker)


def test_ranks_that_disagree_get_the_same_clear_error_without_a_hang():
    messages = distributed.run(2, _disagreement_worker)
    assert messages[0] == messages[1]  # every rank raises the same error, after the same collective
    rows, options, tiling = messages[0]
    assert "ranks disagree on rows: rank 0 has 4, rank 1 has 5" in rows
    assert "ranks disagree on label_smoothing: rank 0 has 0.0, rank 1 has 0.1" in options
    assert "vocabulary slices do not tile [0, 10)" in tiling and "rank 1: [0, 5)" in tiling


LINEAR_CASES = (
    dict(),
    dict(bias=True, label_smoothing=0.1, chunk_size=3),
    dict(weight="full", focal_gamma=2.0, z_loss=1e-3, softcap=5.0, chunk_size=4),
    dict(reduce_input_grad=False, bias=True),
)


def _linear_worker(rank, world):
    import torch.distributed as dist

    total, d = 6 * world + 1, 5
    failures = []
    for i, case in enumerate(LINEAR_CASES):
        for reduction in REDUCTIONS:
            opts = dict(case)
            g = torch.Generator().manual_seed(200 + i)
            n = 10
            x = torch.randn(n, d, generator=g, dtype=torch.float64)
            w = torch.randn(total, d, generator=g, dtype=torch.float64)
            b = torch.randn(total, generator=g, dtype=torch.float64) if opts.pop("bias", False) else None
            t = torch.randint(0, total, (n,), generator=g)
            t[1::3] = -100
            cw = torch.rand(total, generator=g, dtype=torch.float64) + 0.5
            go = torch.rand(n if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
            start, size = _slices(world, total)[rank]
            xs = x.clone().requires_grad_(True)
            ws = w[start:start + size].clone().requires_grad_(True)
            bs = None if b is None else b[start:start + size].clone().requires_grad_(True)
            weight = opts.pop("weight", None)
            loss = lf.linear_cross_entropy(xs, ws, t, linear_bias=bs, weight=cw if weight else None,
                                           reduction=reduction, process_group=dist.group.WORLD, **opts)
            loss.backward(go)
            gx = xs.grad
            if opts.get("reduce_input_grad") is False:  # each rank holds its part: their sum is the gradient
                gx = gx.clone()
                dist.all_reduce(gx)
            ref_opts = {k: v for k, v in opts.items() if k not in ("reduce_input_grad", "chunk_size")}
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            br = None if b is None else b.clone().requires_grad_(True)
            want = lf.linear_cross_entropy(xr, wr, t, linear_bias=br, weight=cw if weight else None,
                                           reduction=reduction, backend="reference", **ref_opts)
            want.backward(go)
            checks = [torch.allclose(loss, want, rtol=1e-10, atol=1e-12),
                      torch.allclose(gx, xr.grad, rtol=1e-9, atol=1e-12),
                      torch.allclose(ws.grad, wr.grad[start:start + size], rtol=1e-9, atol=1e-12)]
            if b is not None:
                checks.append(torch.allclose(bs.grad, br.grad[start:start + size], rtol=1e-9, atol=1e-12))
            if not all(checks):
                failures.append(f"{case} {reduction}: {checks}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_vocab_parallel_linear_cross_entropy_matches_one_process(world):
    distributed.run(world, _linear_worker)


def test_process_group_argument_is_checked():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.cross_entropy(x, t, process_group=object())
    with pytest.raises(ValueError, match="vocab_start is only meaningful with a process_group"):
        lf.cross_entropy(x, t, vocab_start=0)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t, process_group="world")

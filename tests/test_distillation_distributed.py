"""Vocabulary-parallel distillation_loss and linear_distillation_loss on 2 and 4 CPU processes (gloo):
every rank's loss and the gradients of its student slice against one process on the whole vocabulary,
every divergence and reduction, masks, uneven and explicit slices, NaN rows and a partial input
gradient."""
import pytest
import torch

import lossforge_kernels as lf
from tests import distributed
from tests.test_cross_entropy_distributed import _slices
from tests.test_log_probs_distributed import _close, _slice

REDUCTIONS = ("none", "mean", "sum")
DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _distillation_worker(rank, world):
    import torch.distributed as dist

    total, n = 7 * world + 3, 9
    failures = []
    for i, divergence in enumerate(DIVERGENCES):
        for reduction in REDUCTIONS:
            g = torch.Generator().manual_seed(10 * i + len(reduction))
            s = torch.randn(3, n, total, generator=g, dtype=torch.float64) * 3
            t = torch.randn(3, n, total, generator=g, dtype=torch.float64) * 3
            s[1, 2, 4] = float("nan") if reduction == "none" else s[1, 2, 4]
            target = torch.randint(0, total, (3, n), generator=g) if i != 1 else None
            if target is not None:
                target[:, ::4] = -100
            explicit = reduction == "sum"
            temperature = (0.5, 1.0, 2.0)[i]
            go = torch.rand((3, n) if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
            start, size = _slice(world, rank, total, explicit)
            opts = dict(divergence=divergence, beta=0.3, temperature=temperature, reduction=reduction)
            local = s[..., start:start + size].clone().requires_grad_(True)
            loss = lf.distillation_loss(local, t[..., start:start + size], target, process_group=dist.group.WORLD,
                                        vocab_start=start if explicit else None, **opts)
            loss.backward(go)
            full = s.clone().requires_grad_(True)
            want = lf.distillation_loss(full, t, target, backend="reference", **opts)
            want.backward(go)
            if not (_close(loss, want) and _close(local.grad, full.grad[..., start:start + size])):
                failures.append(f"{divergence} {reduction}: loss {loss} vs {want}")
    assert not failures, "\n".join(failures)


def _linear_worker(rank, world):
    import torch.distributed as dist

    total, d, n = 6 * world + 1, 5, 10
    failures = []
    cases = (dict(divergence="kl"), dict(divergence="jsd", bias=True, chunk_size=3, temperature=2.0),
             dict(divergence="reverse_kl", reduce_input_grad=False, bias=True, reduction="none"))
    for i, case in enumerate(cases):
        opts = dict(case)
        g = torch.Generator().manual_seed(i)
        sx, tx = torch.randn(2, n, d, generator=g, dtype=torch.float64), torch.randn(2, n, 4, generator=g,
                                                                                      dtype=torch.float64)
        sw, tw = torch.randn(total, d, generator=g, dtype=torch.float64), torch.randn(total, 4, generator=g,
                                                                                      dtype=torch.float64)
        sb, tb = torch.randn(total, generator=g, dtype=torch.float64), torch.randn(total, generator=g,
                                                                                   dtype=torch.float64)
        target = torch.randint(0, total, (2, n), generator=g)
        target[:, ::3] = -100
        start, size = _slices(world, total)[rank]
        bias = opts.pop("bias", False)
        go = torch.rand((2, n) if opts.get("reduction") == "none" else (), generator=g, dtype=torch.float64) + 0.5
        xs, ws = sx.clone().requires_grad_(True), sw[start:start + size].clone().requires_grad_(True)
        bs = sb[start:start + size].clone().requires_grad_(True) if bias else None
        loss = lf.linear_distillation_loss(xs, ws, tx, tw[start:start + size], target, student_bias=bs,
                                           teacher_bias=tb[start:start + size] if bias else None,
                                           process_group=dist.group.WORLD, **opts)
        loss.backward(go)
        xf, wf = sx.clone().requires_grad_(True), sw.clone().requires_grad_(True)
        bf = sb.clone().requires_grad_(True) if bias else None
        ref_opts = {k: v for k, v in opts.items() if k in ("divergence", "temperature", "reduction")}
        want = lf.linear_distillation_loss(xf, wf, tx, tw, target, student_bias=bf, teacher_bias=tb if bias else None,
                                           backend="reference", **ref_opts)
        want.backward(go)
        x_grad = xs.grad
        if opts.get("reduce_input_grad") is False:  # this rank's part: the sum over ranks is the gradient
            x_grad = x_grad.clone()
            dist.all_reduce(x_grad)
        ok = [_close(loss, want), _close(x_grad, xf.grad), _close(ws.grad, wf.grad[start:start + size])]
        if bias:
            ok.append(_close(bs.grad, bf.grad[start:start + size]))
        if not all(ok):
            failures.append(f"{case}: {ok}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_vocab_parallel_distillation_matches_one_process(world):
    distributed.run(world, _distillation_worker)


@pytest.mark.parametrize("world", [2])  # the slicing is the plain form's, tested at 3
def test_vocab_parallel_linear_distillation_matches_one_process(world):
    distributed.run(world, _linear_worker)


def test_a_teacher_that_requires_grad_is_refused_before_any_collective():
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        lf.distillation_loss(torch.randn(2, 3), torch.randn(2, 3, requires_grad=True),
                             process_group=torch.distributed.group.WORLD)

"""Vocabulary-parallel log_probs and linear_log_probs on 2 and 4 CPU processes (gloo): every rank's
results and the gradients of its slice against one process on the whole vocabulary, with random
grad_outputs on both results, uneven and explicit slices, masked classes, NaN rows and a partial
input gradient."""
import pytest
import torch

import lossforge_kernels as lf
from tests import distributed
from tests.test_cross_entropy_distributed import _slices


def _slice(world, rank, total, explicit):
    slices = _slices(world, total)
    if explicit:  # the slices in reverse rank order
        sizes = [size for _, size in slices][::-1]
        slices = [(sum(sizes[:world - 1 - r]), sizes[world - 1 - r]) for r in range(world)]
    return slices[rank]


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)


def _log_probs_worker(rank, world):
    import torch.distributed as dist

    total, n = 7 * world + 3, 9
    failures = []
    for temperature, explicit in ((1.0, False), (0.5, True), (2.0, False)):
        g = torch.Generator().manual_seed(int(temperature * 10))
        x = torch.randn(3, n, total, generator=g, dtype=torch.float64) * 3
        x[0, 1, : total // 2] = float("-inf")  # masked classes, some slices all -inf
        x[1, 2, 4] = float("nan")
        t = torch.randint(0, total, (3, n), generator=g)
        t[0, 1] = total - 1
        t[:, ::4] = -100
        go = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
        start, size = _slice(world, rank, total, explicit)
        local = x[..., start:start + size].clone().requires_grad_(True)
        logp, ent = lf.log_probs(local, t, temperature=temperature, return_entropy=True, process_group=dist.group.WORLD,
                                 vocab_start=start if explicit else None)
        (logp * go[0] + ent * go[1]).sum().backward()
        full = x.clone().requires_grad_(True)
        want_logp, want_ent = lf.log_probs(full, t, temperature=temperature, return_entropy=True, backend="reference")
        (want_logp * go[0] + want_ent * go[1]).sum().backward()
        if not (_close(logp, want_logp) and _close(ent, want_ent)):
            failures.append(f"T={temperature}: results {logp} {ent} vs {want_logp} {want_ent}")
        if not _close(local.grad, full.grad[..., start:start + size]):
            failures.append(f"T={temperature}: gradient")
    assert not failures, "\n".join(failures)


def _linear_worker(rank, world):
    import torch.distributed as dist

    total, d, n = 6 * world + 1, 5, 10
    failures = []
    for case in (dict(), dict(bias=True, chunk_size=3, temperature=2.0), dict(reduce_input_grad=False, bias=True)):
        opts = dict(case)
        g = torch.Generator().manual_seed(len(case))
        x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
        w = torch.randn(total, d, generator=g, dtype=torch.float64)
        b = torch.randn(total, generator=g, dtype=torch.float64)
        t = torch.randint(0, total, (2, n), generator=g)
        t[:, ::3] = -100
        go = torch.randn(2, 2, n, generator=g, dtype=torch.float64)
        start, size = _slices(world, total)[rank]
        bias = opts.pop("bias", False)
        xs = x.clone().requires_grad_(True)
        ws = w[start:start + size].clone().requires_grad_(True)
        bs = b[start:start + size].clone().requires_grad_(True) if bias else None
        logp, ent = lf.linear_log_probs(xs, ws, t, linear_bias=bs, return_entropy=True, process_group=dist.group.WORLD,
                                        **opts)
        (logp * go[0] + ent * go[1]).sum().backward()
        xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bf = b.clone().requires_grad_(True) if bias else None
        ref_opts = {k: v for k, v in opts.items() if k in ("temperature",)}
        want_logp, want_ent = lf.linear_log_probs(xf, wf, t, linear_bias=bf, return_entropy=True, backend="reference",
                                                  **ref_opts)
        (want_logp * go[0] + want_ent * go[1]).sum().backward()
        x_grad = xs.grad
        if opts.get("reduce_input_grad") is False:  # this rank's part: the sum over ranks is the gradient
            x_grad = x_grad.clone()
            dist.all_reduce(x_grad)
        ok = [_close(logp, want_logp), _close(ent, want_ent), _close(x_grad, xf.grad),
              _close(ws.grad, wf.grad[start:start + size])]
        if bias:
            ok.append(_close(bs.grad, bf.grad[start:start + size]))
        if not all(ok):
            failures.append(f"{case}: {ok}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_vocab_parallel_log_probs_match_one_process(world):
    distributed.run(world, _log_probs_worker)


@pytest.mark.parametrize("world", [2])  # the slicing is the plain form's, tested at 3
def test_vocab_parallel_linear_log_probs_match_one_process(world):
    distributed.run(world, _linear_worker)

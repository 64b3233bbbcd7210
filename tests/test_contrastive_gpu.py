"""Contrastive kernels at scale, on a GPU: no host sync, bf16 at real sizes against the reference,
the memory targets, CUDA-graph capture. Skipped without a CUDA GPU (the small-shape grids of
tests/test_contrastive_kernels.py run on every backend there too)."""
import pytest
import torch

import lossforge_kernels as lf
from tests.conftest import HAS_GPU, assert_close_rel, run_without_host_sync

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
BACKENDS = ["cuda", "triton"]


def _need(backend):
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)


def _inputs(b, m, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, d, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(m, d, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    labels = torch.randint(0, max(1, b // 4), (b,), device="cuda", generator=g)
    s = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    return q, k, labels, s, bias


def _losses(q, k, labels, s, bias, backend, reduction="mean"):
    return {
        "info_nce": lf.info_nce(q, k[:q.shape[0]], logit_scale=s, reduction=reduction, backend=backend),
        "info_nce_extra": lf.info_nce(q, k, logit_scale=s, symmetric=False, reduction=reduction, backend=backend),
        "supcon": lf.supcon_loss(q, labels, reduction=reduction, backend=backend),
        "siglip": lf.siglip_loss(q, k, s, bias, reduction=reduction, backend=backend),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_no_host_sync(backend):
    _need(backend)
    q, k, labels, s, bias = _inputs(300, 333, 64)

    def step():
        for reduction in ("none", "mean", "sum"):
            for loss in _losses(q, k, labels, s, bias, backend, reduction).values():
                loss.sum().backward()

    run_without_host_sync(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_at_scale_matches_the_reference(backend):
    # D = 520 is not a multiple of 16; M > B for the extra-negatives cases.
    _need(backend)
    q, k, labels, s, bias = _inputs(3000, 3777, 520)
    ours = _losses(q, k, labels, s, bias, backend, reduction="none")
    refs = [t.detach().float().requires_grad_(True) for t in (q, k, s, bias)]
    want = _losses(refs[0], refs[1], labels, refs[2], refs[3], "reference", reduction="none")
    for name in ours:
        go = torch.rand_like(want[name]) + 0.5
        got_grads = torch.autograd.grad(ours[name], [q, k, s, bias], go.to(ours[name].dtype), allow_unused=True)
        want_grads = torch.autograd.grad(want[name], refs, go, allow_unused=True)
        assert_close_rel(ours[name].float(), want[name], 1e-2, f"{name} loss")
        for which, g, w in zip(("query", "key", "scale", "bias"), got_grads, want_grads):
            if w is not None and w.abs().sum() > 0:
                assert_close_rel(g.float(), w, 2e-2, f"{name} grad {which}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,d,budget_mib", [(16384, 768, 16), (65536, 512, 64)])
def test_gpu_extra_memory_targets(backend, b, d, budget_mib, dtype):
    # Peak memory of a symmetric fwd+bwd with a learnable scale beyond the inputs and their gradients
    # (CUDA, every dtype: the tiled forward and backward, about 8 (B + M) bytes of inverse norms).
    _need(backend)
    q, k, _, s, _ = _inputs(b, b, d, dtype=dtype)
    lf.info_nce(q, k, logit_scale=s, backend=backend).backward()  # warm up (kernels compiled, allocator)
    q.grad = k.grad = s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lf.info_nce(q, k, logit_scale=s, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * q.numel() * q.element_size()
    assert extra <= budget_mib * 2**20, f"{extra / 2**20:.1f} MiB extra at B={b}, D={d}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_cuda_graph_capture(backend):
    _need(backend)
    q, k, labels, s, bias = _inputs(256, 256, 96)

    def step():
        total = sum(loss for loss in _losses(q, k, labels, s, bias, backend).values())
        total.backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    want = [t.grad.clone() for t in (q, k, s, bias)]
    q.grad = k.grad = s.grad = bias.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    for t, w in zip((q, k, s, bias), want):
        torch.testing.assert_close(t.grad, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_half_step_launches_do_not_grow_with_the_batch(dtype):
    # The half-precision forward and backward run on tensor-core tiles: a fixed number of kernel
    # launches per call (the chunked backward took 8193 per pass at B = 262144).
    _need("cuda")
    q, k, _, s, _ = _inputs(262144, 262144, 64, dtype=dtype)
    lf.info_nce(q, k, logit_scale=s, backend="cuda").backward()  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        lf.info_nce(q, k, logit_scale=s, backend="cuda").backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) <= 64, f"{len(kernels)} device events in a symmetric step at B = 262144"

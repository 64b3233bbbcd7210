"""Cross-entropy kernels at scale, on a GPU: no host sync, huge vocabularies and 64-bit offsets,
every CUDA launch plan, peak memory, CUDA-graph capture. Skipped without a CUDA GPU, except the
launch plans, which also run (smaller) under the CUDA emulation."""
import pytest
import torch
import torch.nn.functional as F

import lossforge_kernels as lf
from tests.conftest import EMULATE, HAS_GPU, assert_close_rel, run_without_host_sync
from tests.test_cross_entropy import make_inputs
from tests.test_cross_entropy_kernels import run_both

REDUCTIONS = ["none", "mean", "sum"]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync(backend):
    # torch raises on any device-to-host copy or synchronisation inside the region.
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    x, t, w = make_inputs(64, 1000, device="cuda", dtype=torch.bfloat16)
    x.requires_grad_(True)
    xs = torch.randn(64, 80, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ts = (torch.rand(64, 80, device="cuda") < 0.3).to(torch.bfloat16)
    def step():
        for reduction in REDUCTIONS:
            lf.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, focal_gamma=2.0,
                             backend=backend).sum().backward()
            lf.sigmoid_focal_loss(xs, ts, reduction=reduction, backend=backend).sum().backward()

    run_without_host_sync(step)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_huge_vocab_and_64bit_offsets(backend):
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    for n, c in ((3, 1_048_576), (2049, 1_048_577)):  # the second has more than 2**31 elements
        if n * c * 2 * 2 > torch.cuda.mem_get_info()[0] * 0.8:
            pytest.skip("not enough free GPU memory")
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, c, (n,), device="cuda")
        loss = lf.cross_entropy(x, t, backend=backend)
        loss.backward()
        rows = torch.arange(n, device="cuda")
        want = torch.logsumexp(x.detach().float(), 1) - x.detach().float()[rows, t]
        torch.testing.assert_close(loss.float(), want.mean(), rtol=2e-2, atol=0)
        # spot-check the last row's gradient, which lies beyond 2**31 elements in the second case
        last = x.detach()[-1].float()
        g = torch.softmax(last, 0)
        g[t[-1]] -= 1
        assert_close_rel(x.grad[-1].float(), g / n, 1e-2, "last row grad")
        del x, loss
        torch.cuda.empty_cache()


@pytest.mark.parametrize("knobs", [{"LOSSFORGE_ROW_THREADS": "1024"}, {"LOSSFORGE_ROW_THREADS": "64"},
                                   {"LOSSFORGE_ROW_CACHE": "0"}, {"LOSSFORGE_ROW_L2_SHARE": "0"},
                                   {"LOSSFORGE_ROW_PREFETCH_KB": "16"},
                                   {"LOSSFORGE_ROW_PREFETCH_KB": "1024", "LOSSFORGE_ROW_THREADS": "1024"}])
def test_gpu_cuda_row_plans_all_agree_with_the_reference(monkeypatch, knobs):
    # The tuning knobs pick other launch plans (block size, shared-memory head, L2 re-read, a
    # persistent grid with a prefetch of the next row); each must compute the same thing. Odd C so
    # rows are misaligned; one long row that cannot be cached; more rows than resident blocks, so
    # that a persistent block walks several rows (ignored ones among them). Also under the CUDA
    # emulation (smaller), where the block sizes the small test grids never reach get their
    # multi-warp reductions and barriers checked.
    if not lf.available_backends()["cuda"].available:
        pytest.skip(lf.available_backends()["cuda"].reason)
    for k, v in knobs.items():
        monkeypatch.setenv(k, v)
    shapes = ((37, 5001, {"label_smoothing": 0.1}), (5, 70001, {"focal_gamma": 0.5, "z_loss": 1e-3}),
              (3001, 2053, {"weighted": True}))
    if EMULATE:
        shapes = ((7, 1001, {"label_smoothing": 0.1}), (2, 30001, {"focal_gamma": 0.5, "z_loss": 1e-3}),
                  (149, 203, {"weighted": True}))
    for n, c, opts in shapes:
        for reduction in ("mean", "none"):
            loss, want, grad, want_grad = run_both("cuda", opts, n, c, reduction)
            assert_close_rel(loss, want, 1e-5, f"{knobs} loss c={c} {reduction}")
            assert_close_rel(grad, want_grad, 1e-5, f"{knobs} grad c={c} {reduction}")


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_peak_memory_beyond_logits_and_gradient(backend):
    # At most 1% of the logits' size beyond the logits and their gradient; with inplace_backward
    # the gradient itself costs nothing either (only per-row buffers remain).
    if not lf.available_backends()[backend].available:
        pytest.skip(lf.available_backends()[backend].reason)
    n, c = 2048, 32000
    logits_bytes = n * c * 2
    for inplace in (False, True):
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, c, (n,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lf.cross_entropy(x, t, inplace_backward=inplace, backend=backend).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        if not inplace:
            extra -= logits_bytes  # the returned gradient
        limit = 64 * n * 4 + 2**20 if inplace else logits_bytes // 100
        assert extra <= limit, f"inplace={inplace}: {extra} extra bytes > {limit}"
        del x, t
        torch.cuda.empty_cache()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    backend = "cuda" if lf.available_backends()["cuda"].available else "triton"
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    for _ in range(2):  # warm up (compilation, allocator) outside the capture
        lf.cross_entropy(x, t, backend=backend).backward()
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = lf.cross_entropy(x, t, backend=backend)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    want = F.cross_entropy(x.detach(), t)
    torch.testing.assert_close(loss, want)

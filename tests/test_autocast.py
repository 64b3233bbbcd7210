"""Every loss under torch.autocast, on every backend: the loss of the inputs as autocast rounds them for
its products, computed in float32, returned as float32, and the same on every backend.

The expected value is the reference in float64 on those rounded values, outside autocast. CPU
autocast takes bfloat16; on a GPU, CUDA autocast is checked in bfloat16 and float16.
"""
from __future__ import annotations

import pytest
import torch

import lossforge_kernels as lf
from tests.conftest import HAS_GPU, assert_close_rel, device_for

B, D, V = 24, 40, 37


def _inputs(device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    labels = torch.randint(0, 4, (B,), generator=generator).to(device)
    return {
        "query": randn(B, D), "key": randn(B, D), "hidden": randn(B, D) * 0.5, "head": randn(V, D) * 0.5,
        "bias": randn(V), "logits": randn(B, V) * 3, "binary": (randn(B, V) > 0).float(), "labels": labels,
        "target": torch.randint(0, V, (B,), generator=generator).to(device),
    }


def _as_autocast(x):
    """x in the autocast dtype, as a product under autocast would hand it on (as is outside autocast)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


# name -> (float inputs it differentiates, the inputs autocast rounds for its products, call)
LOSSES = {
    "info_nce": (("query", "key"), ("query", "key"),
                 lambda t, b: lf.info_nce(t["query"], t["key"], temperature=0.05, backend=b)),
    "info_nce_scale": (("query", "key"), ("query", "key"),
                       lambda t, b: lf.info_nce(t["query"], t["key"], logit_scale=torch.tensor(14.0, device=t[
                           "query"].device), symmetric=False, normalize=False, backend=b)),
    "supcon": (("query",), ("query",), lambda t, b: lf.supcon_loss(t["query"], t["labels"], temperature=0.1,
                                                                  backend=b)),
    "siglip": (("query", "key"), ("query", "key"),
               lambda t, b: lf.siglip_loss(t["query"], t["key"], 10.0, -10.0, backend=b)),
    "linear_cross_entropy": (("hidden", "head", "bias"), ("hidden", "head", "bias"),
                             lambda t, b: lf.linear_cross_entropy(t["hidden"], t["head"], t["target"],
                                                                  linear_bias=t["bias"], label_smoothing=0.1,
                                                                  backend=b)),
    "cross_entropy": (("logits",), (), lambda t, b: lf.cross_entropy(t["logits"], t["target"], z_loss=1e-3,
                                                                     backend=b)),
    # logits from a product under autocast come in its dtype; torch's cross_entropy then returns float32
    "cross_entropy_half_logits": (("logits",), ("logits",),
                                  lambda t, b: lf.cross_entropy(_as_autocast(t["logits"]), t["target"],
                                                                label_smoothing=0.1, reduction="none", backend=b)),
    "focal_loss": (("logits",), (), lambda t, b: lf.focal_loss(t["logits"], t["target"], gamma=2.0, backend=b)),
    "sigmoid_focal_loss": (("logits",), (), lambda t, b: lf.sigmoid_focal_loss(t["logits"], t["binary"],
                                                                               reduction="mean", backend=b)),
    **{f"triplet_{m}": (("query",), ("query",),
                        (lambda m: lambda t, b: lf.triplet_loss(t["query"], t["labels"], mining=m, margin=0.5,
                                                                backend=b))(m))
       for m in ("batch_hard", "semi_hard", "batch_all")},
}


def _autocasts(backend):
    if device_for(backend) == "cpu":
        return [("cpu", torch.bfloat16)]
    return [("cuda", torch.bfloat16), ("cuda", torch.float16)]


CASES = [pytest.param(name, id=name) for name in LOSSES]


def _expected(name, tensors, grad_output, dtype):
    """The float64 reference on the values autocast hands the products, outside autocast."""
    grads, rounded, call = LOSSES[name]
    leaves = {k: (v.detach().to(dtype).double() if k in rounded else v.detach().double())
              .requires_grad_(k in grads) if v.is_floating_point() and k != "binary" else v
              for k, v in tensors.items()}
    loss = call(leaves, "reference")
    return loss, torch.autograd.grad(loss, [leaves[k] for k in grads], grad_output.double())


@pytest.mark.parametrize("name", CASES)
def test_loss_under_autocast(any_backend, name):
    device = device_for(any_backend)
    grads, _, call = LOSSES[name]
    for device_type, dtype in _autocasts(any_backend):
        tensors = _inputs(device, torch.Generator().manual_seed(7))
        for k in grads:
            tensors[k].requires_grad_(True)
        with torch.autocast(device_type, dtype=dtype):
            loss = call(tensors, any_backend)
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
        got = torch.autograd.grad(loss, [tensors[k] for k in grads], go)
        want, want_grads = _expected(name, tensors, go, dtype)
        assert loss.dtype == torch.float32, f"{name} under autocast returned {loss.dtype}"
        # The reference computes in float32 from exactly these values; the kernels round what they
        # keep in the products' dtype (a logits chunk, the gradients) as outside autocast.
        tol = 1e-5 if any_backend == "reference" else 4 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
        assert_close_rel(loss, want, tol, f"{name} loss ({any_backend}, {device_type} {dtype})")
        grad_tol = 2 * (2**-8 if dtype == torch.bfloat16 else 2**-11)  # the gradient comes back through a cast
        for k, g, w in zip(grads, got, want_grads):
            assert g.dtype == tensors[k].dtype
            assert_close_rel(g, w, max(grad_tol, tol), f"{name} d/d{k} ({any_backend}, {device_type} {dtype})")


@pytest.mark.skipif(not HAS_GPU, reason="CUDA autocast needs a GPU")
def test_cpu_autocast_leaves_cuda_tensors_alone():
    tensors = _inputs("cuda", torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lf.info_nce(tensors["query"], tensors["key"])
    torch.testing.assert_close(loss, lf.info_nce(tensors["query"], tensors["key"]))


def test_float64_is_left_alone(any_backend):
    # autocast never recasts float64; the losses follow it (the reference runs float64 on any backend).
    tensors = _inputs(device_for(any_backend), torch.Generator().manual_seed(5))
    q, k = tensors["query"].double(), tensors["key"].double()
    with torch.autocast(device_for(any_backend), dtype=torch.bfloat16):
        loss = lf.info_nce(q, k, backend="reference")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, lf.info_nce(q, k, backend="reference"))

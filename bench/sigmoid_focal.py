"""Sigmoid (per-element binary) focal loss suite: the detection-head shape, logits and targets in bf16.

Bytes model: fwd+bwd reads logits and targets and writes the gradient (3 * element size per
element); fwd reads both (2 * element size). This loss is short and elementwise, so it is the
one where L2-cold timing and the CUDA-graph replay (see bench/__init__.py) matter most.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, imported, standard_providers

OPTIONS = {"alpha": 0.25, "gamma": 2.0, "reduction": "mean"}


def cases(profile: str) -> list[Case]:
    shape, dtype = {"gpu": ((262144, 80), torch.bfloat16), "gpu-quick": ((262144, 80), torch.bfloat16),
                    "cpu": ((4096, 80), torch.float32), "cpu-quick": ((4096, 80), torch.float32),
                    "tiny": ((31, 7), torch.float32)}[profile]
    out = [Case("mean", shape, dtype, "fwd+bwd", OPTIONS)]
    if not profile.endswith("quick"):
        out += [Case("reduction=none", shape, dtype, "fwd+bwd", dict(OPTIONS, reduction="none")),
                Case("mean", shape, dtype, "fwd", OPTIONS)]
    return out


def make_inputs(case: Case, device, gen) -> dict:
    x = torch.randn(case.shape, generator=gen, device=device, dtype=case.dtype) * 3
    t = (torch.rand(case.shape, generator=gen, device=device) < 0.1).to(case.dtype)  # sparse positives
    inputs = {"input": x.requires_grad_(case.mode == "fwd+bwd"), "target": t}
    if case.options["reduction"] == "none" and case.mode == "fwd+bwd":
        inputs["grad_output"] = torch.rand(case.shape, generator=gen, device=device, dtype=case.dtype) + 0.5
    return inputs


def bytes_model(case: Case) -> tuple[int, str]:
    size = torch.finfo(case.dtype).bits // 8
    numel = case.shape[0] * case.shape[1]
    if case.mode == "fwd":
        return 2 * numel * size, "sigmoid focal fwd: 2*elem_size per element (read x, t)"
    return 3 * numel * size, "sigmoid focal fwd+bwd: 3*elem_size per element (read x, t; write gradient)"


def eager_loss(x, t, *, alpha=0.25, gamma=2.0, reduction="none"):
    """The textbook formula (torchvision's), in the input's dtype."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()


def _bind_eager(case):
    return lambda inputs: eager_loss(inputs["input"], inputs["target"], **case.options)


def _lf_call(lf, case, inputs, backend):
    return lf.sigmoid_focal_loss(inputs["input"], inputs["target"], backend=backend, **case.options)


def reference(case, inputs):
    import lossforge_kernels as lf

    return _lf_call(lf, case, inputs, "reference")


def _torchvision(settings) -> Provider | str:
    sigmoid_focal_loss = imported("torchvision.ops", "sigmoid_focal_loss", settings)
    if isinstance(sigmoid_focal_loss, str):
        return sigmoid_focal_loss
    return Provider("torchvision", lambda case: lambda inputs: sigmoid_focal_loss(
        inputs["input"], inputs["target"], **case.options))


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("torchvision", _torchvision))


ORDER = 30  # where `python -m bench` runs this suite among the others (lowest first)
SUITE = Suite("sigmoid_focal", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("torchvision",))

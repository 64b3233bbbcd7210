"""Cross-entropy suite: mean CE at language-model vocabularies, and each option at one shape.

Bytes model: a memory-bound CE reads every logit once and, in fwd+bwd, writes its gradient once
(2 * element size per logit); fwd only reads (1 * element size). Targets and per-row outputs are
a few bytes per row and are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, imported, standard_providers

BF16, F32 = torch.bfloat16, torch.float32
LM = (8192, 128256)  # the shape at which every option is measured

OPTION_CASES = (  # (name, options): each one fused option on top of mean CE
    ("label_smoothing=0.1", {"label_smoothing": 0.1}),
    ("focal gamma=2 alpha=0.25", {"focal_gamma": 2.0, "focal_alpha": 0.25}),
    ("z_loss=1e-4", {"z_loss": 1e-4}),
    ("softcap=30", {"softcap": 30.0}),
    ("reduction=none", {"reduction": "none"}),
)


def _profile_cases(shapes, option_shape, dtype, options=OPTION_CASES):
    cases = [Case("mean", s, dtype, "fwd+bwd") for s in shapes]
    cases += [Case(name, option_shape, dtype, "fwd+bwd", opts) for name, opts in options]
    return cases + [Case("mean", option_shape, dtype, "fwd")]


def cases(profile: str) -> list[Case]:
    quick_options = OPTION_CASES[1:3]  # focal and z-loss: the two that stock torch has no kernel for
    return {
        "gpu": lambda: _profile_cases([(8192, 32000), LM, (4096, 256000)], LM, BF16),
        "gpu-quick": lambda: _profile_cases([(8192, 32000), LM], LM, BF16, quick_options),
        "cpu": lambda: _profile_cases([(256, 8192)], (256, 8192), F32),
        "cpu-quick": lambda: _profile_cases([(256, 8192)], (256, 8192), F32, quick_options),
        "tiny": lambda: _profile_cases([(13, 67)], (13, 67), F32),
    }[profile]()


def make_inputs(case: Case, device, gen) -> dict:
    n, v = case.shape
    x = torch.randn(n, v, generator=gen, device=device, dtype=case.dtype) * 2
    inputs = {"input": x.requires_grad_(case.mode == "fwd+bwd"),
              "target": torch.randint(0, v, (n,), generator=gen, device=device)}
    if case.options.get("reduction") == "none" and case.mode == "fwd+bwd":
        inputs["grad_output"] = torch.rand(n, generator=gen, device=device, dtype=case.dtype) + 0.5
    return inputs


def bytes_model(case: Case) -> tuple[int, str]:
    n, v = case.shape
    size = torch.finfo(case.dtype).bits // 8
    if case.mode == "fwd":
        return n * v * size, "CE fwd: 1*elem_size per logit (read)"
    return 2 * n * v * size, "CE fwd+bwd: 2*elem_size per logit (read logits, write gradient)"


def _reduce(rows, reduction):
    return rows if reduction == "none" else rows.mean() if reduction == "mean" else rows.sum()


def eager_loss(x, target, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
               focal_alpha=None):
    """What a user writes with stock torch for each option, in the input's dtype like F.cross_entropy."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if focal_gamma or focal_alpha is not None:
        logpt = F.log_softmax(x, dim=-1).gather(1, target[:, None]).squeeze(1)
        rows = -((1 - logpt.exp()) ** focal_gamma) * logpt
        return _reduce(rows if focal_alpha is None else focal_alpha * rows, reduction)
    loss = F.cross_entropy(x, target, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * _reduce(torch.logsumexp(x, dim=-1).square(), reduction)
    return loss


def _bind_eager(case):
    return lambda inputs: eager_loss(inputs["input"], inputs["target"], **case.options)


def _lf_call(lf, case, inputs, backend):
    return lf.cross_entropy(inputs["input"], inputs["target"], backend=backend, **case.options)


def reference(case, inputs):
    import lossforge_kernels as lf

    return _lf_call(lf, case, inputs, "reference")


def _liger(settings) -> Provider | str:
    liger_cross_entropy = imported("liger_kernel.transformers.functional", "liger_cross_entropy", settings,
                                   runs_on_cuda_only="Liger-Kernel")
    if isinstance(liger_cross_entropy, str):
        return liger_cross_entropy

    def bind(case):
        o = case.options
        if o.get("focal_gamma") or o.get("focal_alpha") is not None:
            raise Unsupported("no focal option")
        kwargs = {"reduction": o.get("reduction", "mean"), "label_smoothing": o.get("label_smoothing", 0.0)}
        if o.get("z_loss"):
            kwargs["lse_square_scale"] = o["z_loss"]
        if o.get("softcap") is not None:
            kwargs["softcap"] = o["softcap"]
        return lambda inputs: liger_cross_entropy(inputs["input"], inputs["target"], **kwargs)

    # Liger writes the gradient into the logits during the forward.
    return Provider("liger", bind, mutates_input=True)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("liger", _liger))


ORDER = 10  # where `python -m bench` runs this suite among the others (lowest first)
SUITE = Suite("cross_entropy", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("liger",))

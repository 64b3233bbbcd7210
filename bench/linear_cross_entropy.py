"""Linear cross-entropy suite: a language-model head's loss, input (N, D) and weight (V, D) in bf16.

Providers beyond the standard ones: torch.lce (torch.nn.functional.linear_cross_entropy, logits
materialised) and torch.lce.chunked (its chunked options), Liger-Kernel's and Cut Cross-Entropy's
fused linear CE, each where installed.

FLOPs model: the three matrix products no fused implementation avoids, 6 N D V with gradients
(logits, input gradient, weight gradient) and 2 N D V for the forward alone, whatever a provider
really runs (ours recomputes the logits in the 'none' backward: 8 N D V). TFLOP/s and % of a
bf16 matrix product measured in the same run. Bytes model (for the TB/s column): the inputs read
and their gradients written. `extra MB` includes the V x D fp32 weight-gradient accumulator our
kernels keep by default for a bf16 weight; the table shows that part apart. The memory plot
(linear_cross_entropy_memory.png) puts every provider's time against its extra memory, ours at
several chunk sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_entropy import eager_loss
from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, imported, standard_providers

BF16, F32 = torch.bfloat16, torch.float32
LM = (8192, 4096, 128256)  # N, D, V: the shape every option and chunk size is measured at
OPTION_CASES = (
    ("label_smoothing=0.1", {"label_smoothing": 0.1}),
    ("z_loss=1e-4", {"z_loss": 1e-4}),
    ("softcap=30", {"softcap": 30.0}),
    ("focal gamma=2 alpha=0.25", {"focal_gamma": 2.0, "focal_alpha": 0.25}),
    ("reduction=none", {"reduction": "none"}),
)
ONLY_OURS = ("chunk_size", "fp32_weight_grad")  # options no other provider has


def _chunk_cases(shape, dtype, sizes):
    return [Case(f"chunk_size={c}", shape, dtype, "fwd+bwd", {"chunk_size": c}) for c in sizes]


def _profile(shapes, option_shape, dtype, options, chunks):
    cases = [Case("mean", s, dtype, "fwd+bwd") for s in shapes]
    cases += [Case(name, option_shape, dtype, "fwd+bwd", opts) for name, opts in options]
    cases += _chunk_cases(option_shape, dtype, chunks)
    return cases + [Case("mean", option_shape, dtype, "fwd")]


def cases(profile: str) -> list[Case]:
    return {
        "gpu": lambda: _profile([LM, (4096, 2048, 32000), (16384, 4096, 256000)], LM, BF16, OPTION_CASES,
                                (256, 512, 2048)),
        "gpu-quick": lambda: _profile([LM, (4096, 2048, 32000)], LM, BF16, OPTION_CASES[1:2] + OPTION_CASES[4:],
                                      (512,)),
        "cpu": lambda: _profile([(512, 128, 4096)], (512, 128, 4096), F32, OPTION_CASES, (128,)),
        "cpu-quick": lambda: _profile([(512, 128, 4096)], (512, 128, 4096), F32, OPTION_CASES[4:], ()),
        "tiny": lambda: _profile([(13, 8, 67)], (13, 8, 67), F32, OPTION_CASES, (5,)),
    }[profile]()


def make_inputs(case: Case, device, gen) -> dict:
    n, d, v = case.shape
    grads = case.mode == "fwd+bwd"
    x = torch.randn(n, d, generator=gen, device=device, dtype=case.dtype)
    w = (torch.randn(v, d, generator=gen, device=device, dtype=F32) * (2.0 / d**0.5)).to(case.dtype)
    inputs = {"input": x.requires_grad_(grads), "linear_weight": w.requires_grad_(grads),
              "target": torch.randint(0, v, (n,), generator=gen, device=device)}
    if case.options.get("reduction") == "none" and grads:
        inputs["grad_output"] = torch.rand(n, generator=gen, device=device, dtype=case.dtype) + 0.5
    return inputs


def bytes_model(case: Case) -> tuple[int, str]:
    n, d, v = case.shape
    size = torch.finfo(case.dtype).bits // 8
    if case.mode == "fwd":
        return (n * d + v * d) * size, "linear CE fwd: input and weight read once"
    return 2 * (n * d + v * d) * size, "linear CE fwd+bwd: input and weight read, their gradients written"


def flops_model(case: Case) -> tuple[int, str]:
    n, d, v = case.shape
    if case.mode == "fwd":
        return 2 * n * d * v, "fwd: 2*N*D*V (the logits' product)"
    return 6 * n * d * v, "fwd+bwd: 6*N*D*V (logits, input-gradient and weight-gradient products)"


def accum_mb(case: Case, provider: str) -> float:
    """Our kernels' V x D fp32 weight-gradient accumulator, part of their extra memory for a half weight."""
    n, d, v = case.shape
    ours = provider in ("lf-cuda", "lf-triton") and case.mode == "fwd+bwd"
    wide = case.options.get("fp32_weight_grad", True) and case.dtype != F32
    return v * d * 4 / 2**20 if ours and wide else 0.0


def _loss_options(case):
    if any(k in case.options for k in ONLY_OURS):
        raise Unsupported("a lossforge knob")
    return case.options


def _bind_eager(case):
    opts = _loss_options(case)
    return lambda inputs: eager_loss(F.linear(inputs["input"], inputs["linear_weight"]), inputs["target"], **opts)


def _lf_call(lf, case, inputs, backend):
    return lf.linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"], backend=backend,
                                   **case.options)


def reference(case, inputs):
    import lossforge_kernels as lf

    return _lf_call(lf, case, inputs, "reference")


def _torch_lce(chunked: bool):
    def make(settings) -> Provider | str:
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"

        def bind(case):
            o = _loss_options(case)
            if set(o) - {"reduction", "label_smoothing"}:
                raise Unsupported("only reduction and label_smoothing")
            if chunked and o.get("label_smoothing"):
                raise Unsupported("its chunked path has no label smoothing")
            extra = {"options": torch.nn.LinearCrossEntropyOptions()} if chunked else {}
            return lambda inputs: F.linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"],
                                                         **o, **extra)

        return Provider("torch.lce.chunked" if chunked else "torch.lce", bind)
    return make


def _liger(settings) -> Provider | str:
    liger_fused_linear_cross_entropy = imported("liger_kernel.transformers.functional",
                                                "liger_fused_linear_cross_entropy", settings,
                                                runs_on_cuda_only="Liger-Kernel")
    if isinstance(liger_fused_linear_cross_entropy, str):
        return liger_fused_linear_cross_entropy

    def bind(case):
        o = _loss_options(case)
        if o.get("focal_gamma") or o.get("focal_alpha") is not None:
            raise Unsupported("no focal option")
        kwargs = {"reduction": o.get("reduction", "mean"), "label_smoothing": o.get("label_smoothing", 0.0),
                  "lse_square_scale": o.get("z_loss", 0.0), "softcap": o.get("softcap")}

        def call(inputs):
            out = liger_fused_linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"],
                                                   **kwargs)
            return out[0] if isinstance(out, tuple) else out
        return call

    return Provider("liger", bind)


def _cce(settings) -> Provider | str:
    cce_linear_cross_entropy = imported("cut_cross_entropy", "linear_cross_entropy", settings,
                                        runs_on_cuda_only="Cut Cross-Entropy")
    if isinstance(cce_linear_cross_entropy, str):
        return cce_linear_cross_entropy

    def bind(case):
        o = _loss_options(case)
        if set(o) - {"reduction", "softcap"}:
            raise Unsupported("only reduction and softcap")
        # its defaults: gradients below a threshold are filtered out (the correctness column shows it)
        return lambda inputs: cce_linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"],
                                                       **o)

    return Provider("cce", bind)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("torch.lce", _torch_lce(False)),
                              ("torch.lce.chunked", _torch_lce(True)), ("liger", _liger), ("cce", _cce))


ORDER = 20  # where `python -m bench` runs this suite among the others (lowest first)
SUITE = Suite("linear_cross_entropy", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("torch.lce", "torch.lce.chunked", "liger", "cce"),
              grads=("input", "linear_weight"), flops_model=flops_model, accum_mb=accum_mb, tradeoff_plot=True)

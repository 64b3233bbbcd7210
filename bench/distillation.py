"""Distillation suite: a student's and a teacher's language-model heads, inputs (N, D) and weights
(V, D) in bf16, a divergence between their softmaxes over the vocabulary ('mean' over the tokens),
with gradients to the student's input and weight.

Providers beyond the standard ones (torch: the textbook formula on both heads' materialised logits,
and its torch.compile): torch.chunked, the same a chunk of rows at a time under activation
checkpointing; liger, Liger-Kernel's fused linear JSD where installed (jsd at beta 0.5, where its
beta convention and ours agree); and lf.linear_cross_entropy, our fused linear cross-entropy on the
student's head, the reference point (a different loss: its max_rel_err column says nothing).

FLOPs model: 8 N D V with gradients (both heads' logits, the student's input and weight gradients),
4 N D V forward only. Bytes model: both heads' inputs and weights read, the student's gradients
written. The memory plot (distillation_memory.png) puts time against extra memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, imported, standard_providers
from .linear_cross_entropy import accum_mb
from .log_probs import RL, chunked_rows

BF16, F32 = torch.bfloat16, torch.float32
ONLY_OURS = ("chunk_size",)


def cases(profile: str) -> list[Case]:
    jsd, kl = {"divergence": "jsd", "beta": 0.5}, {"divergence": "kl"}
    shape, dtype = {"gpu": (RL, BF16), "gpu-quick": (RL, BF16), "cpu": ((512, 128, 4096), F32),
                    "cpu-quick": ((512, 128, 4096), F32), "tiny": ((13, 8, 67), F32)}[profile]
    out = [Case("jsd", shape, dtype, "fwd+bwd", jsd)]
    if not profile.endswith("quick"):
        out += [Case("kl", shape, dtype, "fwd+bwd", kl),
                Case("reverse_kl temperature=2", shape, dtype, "fwd+bwd", {"divergence": "reverse_kl",
                                                                           "temperature": 2.0})]
    if profile == "gpu":
        out += [Case(f"jsd chunk_size={c}", shape, dtype, "fwd+bwd", dict(jsd, chunk_size=c)) for c in (512, 2048)]
    if not profile.endswith("quick"):
        out.append(Case("jsd", shape, dtype, "fwd", jsd))
    return out


def make_inputs(case: Case, device, gen) -> dict:
    n, d, v = case.shape
    grads = case.mode == "fwd+bwd"

    def head(scale=1.0):
        return (torch.randn(v, d, generator=gen, device=device, dtype=F32) * (scale * 2.0 / d**0.5)).to(case.dtype)

    x = torch.randn(n, d, generator=gen, device=device, dtype=case.dtype)
    return {"input": x.requires_grad_(grads), "linear_weight": head().requires_grad_(grads),
            "teacher_input": torch.randn(n, d, generator=gen, device=device, dtype=case.dtype),
            "teacher_weight": head(1.5), "target": torch.randint(0, v, (n,), generator=gen, device=device)}


def bytes_model(case: Case) -> tuple[int, str]:
    n, d, v = case.shape
    size = torch.finfo(case.dtype).bits // 8
    if case.mode == "fwd":
        return 2 * (n * d + v * d) * size, "fwd: both heads' inputs and weights read once"
    return 3 * (n * d + v * d) * size, "fwd+bwd: both heads' inputs and weights read, the student's gradients written"


def flops_model(case: Case) -> tuple[int, str]:
    n, d, v = case.shape
    if case.mode == "fwd":
        return 4 * n * d * v, "fwd: 4*N*D*V (both heads' logits)"
    return 8 * n * d * v, "fwd+bwd: 8*N*D*V (both heads' logits, the student's input and weight gradients)"


def divergence_rows(student, teacher, divergence="kl", beta=0.5, temperature=1.0):
    """The textbook per-token divergence of two heads' logits, in float32."""
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    if divergence == "kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if divergence == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)),
                                         log_s + torch.log(torch.tensor(1.0 - beta))]), dim=0)
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1.0 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)


def _options(case):
    if any(k in case.options for k in ONLY_OURS):
        raise Unsupported("a lossforge knob")
    return case.options


def _heads_rows(x, tx, w, tw, opts):
    with torch.no_grad():
        teacher = F.linear(tx, tw)
    return (divergence_rows(F.linear(x, w), teacher, **opts),)


def _bind_eager(case):
    opts = _options(case)
    return lambda inputs: _heads_rows(inputs["input"], inputs["teacher_input"], inputs["linear_weight"],
                                      inputs["teacher_weight"], opts)[0].mean()


def _lf_call(lf, case, inputs, backend):
    return lf.linear_distillation_loss(inputs["input"], inputs["linear_weight"], inputs["teacher_input"],
                                       inputs["teacher_weight"], backend=backend, **case.options)


def reference(case, inputs):
    import lossforge_kernels as lf

    return _lf_call(lf, case, inputs, "reference")


def _chunked(settings) -> Provider:
    def bind(case):
        opts = _options(case)

        def rows(x, tx, w, tw):
            return _heads_rows(x, tx, w, tw, opts)

        return lambda inputs: chunked_rows(rows, (inputs["input"], inputs["teacher_input"]), inputs["linear_weight"],
                                           inputs["teacher_weight"])[0].mean()

    return Provider("torch.chunked", bind)


def _liger(settings) -> Provider | str:
    liger_fused_linear_jsd = imported("liger_kernel.transformers.functional", "liger_fused_linear_jsd", settings,
                                      runs_on_cuda_only="Liger-Kernel")
    if isinstance(liger_fused_linear_jsd, str):
        return liger_fused_linear_jsd

    def bind(case):
        o = _options(case)
        if o.get("divergence") != "jsd" or o.get("beta", 0.5) != 0.5:
            raise Unsupported("its fused linear JSD, compared at beta 0.5")
        return lambda inputs: liger_fused_linear_jsd(inputs["input"], inputs["linear_weight"], inputs["teacher_input"],
                                                     inputs["teacher_weight"], shift_labels=None, jsd_beta=0.5,
                                                     temperature=o.get("temperature", 1.0))

    return Provider("liger", bind)


def _linear_cross_entropy(settings) -> Provider:
    def bind(case):
        import lossforge_kernels as lf

        _options(case)
        return lambda inputs: lf.linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"])

    return Provider("lf.linear_cross_entropy", bind)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("torch.chunked", _chunked), ("liger", _liger),
                              ("lf.linear_cross_entropy", _linear_cross_entropy))


ORDER = 27  # after linear_cross_entropy, its reference point
SUITE = Suite("distillation", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("torch.chunked", "liger", "lf.linear_cross_entropy"),
              grads=("input", "linear_weight"), flops_model=flops_model, accum_mb=accum_mb, tradeoff_plot=True)

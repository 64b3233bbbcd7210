"""Per-token log-probs and entropy suite (the RL heads): a language-model head, input (N, D) and
weight (V, D) in bf16, the log-probability of each sampled token and the entropy of each position,
with gradients through both.

Every provider returns sum(a * log_probs) + sum(b * entropy) for fixed random per-token a and b (a
policy-gradient term and an entropy bonus), so the backward carries grad_outputs of both results.
Providers beyond the standard ones (torch: the textbook formula on materialised logits, and its
torch.compile): torch.chunked, what RL frameworks write (the logits of a chunk of rows,
log_softmax, gather, entropy, each chunk under activation checkpointing so that only a chunk's
logits live); and lf.linear_cross_entropy, our fused linear cross-entropy ('mean') on the same
inputs, the reference point the log-probs head is held to. It computes a different loss, so its
max_rel_err column says nothing.

FLOPs model: the three products no fused implementation avoids, 6 N D V with gradients and 2 N D V
forward only, whatever a provider really runs (ours recomputes the logits in the backward, since the
grad_outputs are not known in the forward: 8 N D V). Bytes model: the inputs read and their
gradients written. The memory plot (log_probs_memory.png) puts time against extra memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import linear_cross_entropy as lce
from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, standard_providers
from .linear_cross_entropy import accum_mb

BF16, F32 = torch.bfloat16, torch.float32
RL = (8192, 4096, 151936)  # N, D, V: a Qwen-sized vocabulary at 8192 tokens
CHUNK_ROWS = 1024  # torch.chunked's rows per chunk, a common setting in RL frameworks
ONLY_OURS = ("chunk_size",)


def cases(profile: str) -> list[Case]:
    both, one = {"return_entropy": True}, {"return_entropy": False}
    shape, dtype = {"gpu": (RL, BF16), "gpu-quick": (RL, BF16), "cpu": ((512, 128, 4096), F32),
                    "cpu-quick": ((512, 128, 4096), F32), "tiny": ((13, 8, 67), F32)}[profile]
    out = [Case("log_probs+entropy", shape, dtype, "fwd+bwd", both)]
    if profile == "gpu":
        out += [Case("log_probs", shape, dtype, "fwd+bwd", one),
                Case("temperature=0.7", shape, dtype, "fwd+bwd", dict(both, temperature=0.7))]
        out += [Case(f"chunk_size={c}", shape, dtype, "fwd+bwd", dict(both, chunk_size=c)) for c in (512, 2048)]
    if not profile.endswith("quick"):
        out.append(Case("log_probs+entropy", shape, dtype, "fwd", both))
    return out


def make_inputs(case: Case, device, gen) -> dict:
    n, d, v = case.shape
    grads = case.mode == "fwd+bwd"
    x = torch.randn(n, d, generator=gen, device=device, dtype=case.dtype)
    w = (torch.randn(v, d, generator=gen, device=device, dtype=F32) * (2.0 / d**0.5)).to(case.dtype)
    return {"input": x.requires_grad_(grads), "linear_weight": w.requires_grad_(grads),
            "target": torch.randint(0, v, (n,), generator=gen, device=device),
            "coef_log_probs": torch.randn(n, generator=gen, device=device),
            "coef_entropy": torch.rand(n, generator=gen, device=device) * 0.01}


def bytes_model(case: Case) -> tuple[int, str]:
    nbytes, _ = lce.bytes_model(case)  # the same tensors as linear cross-entropy's
    if case.mode == "fwd":
        return nbytes, "fwd: input and weight read once"
    return nbytes, "fwd+bwd: input and weight read, their gradients written"


def flops_model(case: Case) -> tuple[int, str]:
    flops, _ = lce.flops_model(case)
    if case.mode == "fwd":
        return flops, "fwd: 2*N*D*V (the logits' product)"
    return flops, "fwd+bwd: 6*N*D*V (logits, input-gradient and weight-gradient products; ours runs 8*N*D*V)"


def objective(inputs, log_p, entropy=None):
    """The scalar every provider returns: sum(a * log_probs) (+ sum(b * entropy))."""
    total = (log_p.float() * inputs["coef_log_probs"]).sum()
    return total if entropy is None else total + (entropy.float() * inputs["coef_entropy"]).sum()


def textbook(logits, target, temperature, return_entropy):
    """log_softmax(z)[target] and -sum p log p of z = logits / temperature, in float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, target[:, None]).squeeze(-1)
    return picked, (-(logp.exp() * logp).sum(-1) if return_entropy else None)


def _options(case):
    if any(k in case.options for k in ONLY_OURS):
        raise Unsupported("a lossforge knob")
    return case.options.get("temperature", 1.0), case.options["return_entropy"]


def _bind_eager(case):
    temperature, both = _options(case)
    return lambda inputs: objective(inputs, *textbook(F.linear(inputs["input"], inputs["linear_weight"]),
                                                      inputs["target"], temperature, both))


def _lf_call(lf, case, inputs, backend):
    out = lf.linear_log_probs(inputs["input"], inputs["linear_weight"], inputs["target"], backend=backend,
                              **case.options)
    return objective(inputs, *out) if case.options["return_entropy"] else objective(inputs, out)


def reference(case, inputs):
    import lossforge_kernels as lf

    return _lf_call(lf, case, inputs, "reference")


def chunked_rows(fn, rows, *shared):
    """fn(chunk of each of `rows`, *shared) over CHUNK_ROWS rows at a time, each chunk checkpointed (its
    logits recomputed in the backward), outputs concatenated: how RL frameworks bound the logits."""
    n = rows[0].shape[0]
    parts = [checkpoint(fn, *[r[i:i + CHUNK_ROWS] for r in rows], *shared, use_reentrant=False)
             for i in range(0, n, CHUNK_ROWS)]
    return [torch.cat(p) if p[0] is not None else None for p in zip(*parts)]


def _chunked(settings) -> Provider:
    def bind(case):
        temperature, both = _options(case)

        def rows(x, target, w):
            return textbook(F.linear(x, w), target, temperature, both)

        return lambda inputs: objective(inputs, *chunked_rows(rows, (inputs["input"], inputs["target"]),
                                                              inputs["linear_weight"]))

    return Provider("torch.chunked", bind)


def _linear_cross_entropy(settings) -> Provider:
    def bind(case):
        import lossforge_kernels as lf

        _options(case)
        return lambda inputs: lf.linear_cross_entropy(inputs["input"], inputs["linear_weight"], inputs["target"])

    return Provider("lf.linear_cross_entropy", bind)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("torch.chunked", _chunked),
                              ("lf.linear_cross_entropy", _linear_cross_entropy))


ORDER = 25  # after linear_cross_entropy, its reference point
SUITE = Suite("log_probs", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("torch.chunked", "lf.linear_cross_entropy"), grads=("input", "linear_weight"),
              flops_model=flops_model, accum_mb=accum_mb, tradeoff_plot=True)

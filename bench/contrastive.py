"""Contrastive suite: symmetric CLIP InfoNCE with a learnable scale, SigLIP and SupCon, embeddings in bf16.

Inputs: query ("input") and key (B, D), or SupCon's features and labels (4 rows per class); the
scale is learnt as its log (CLIP's parameterisation), SigLIP's bias too. Providers beyond the
standard ones (torch eager and torch.compile run the textbook formulas, which hold the (B, B)
logits): Inf-CL (one call per direction) and open_clip's ClipLoss / SigLipLoss, where installed.
Providers that hold the logits are not run where those alone would take over a third of the GPU.

FLOPs model: four B x M x D products per fwd+bwd (the similarities, their recomputation and the two
gradients: 8 B M D), one forward (2 B M D), whatever a provider really runs; TFLOP/s and % of a
bf16 matrix product measured in the same run. Bytes model: the embeddings read and their
gradients written.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .harness import STANDARD_PROVIDERS, Case, Provider, Suite, Unsupported, imported, standard_providers

BF16, F32 = torch.bfloat16, torch.float32
PER_CLASS = 4  # SupCon rows per label
INIT = {"info_nce": (math.log(1 / 0.07), 0.0), "siglip": (math.log(10.0), -10.0), "supcon": (0.0, 0.0)}
TEMPERATURE = 0.07  # SupCon's


def _profile(shapes, dtype, losses, big=()):
    out = [Case(loss, s, dtype, "fwd+bwd", {"loss": loss}) for s in shapes for loss in losses]
    out += [Case("info_nce", s, dtype, "fwd+bwd", {"loss": "info_nce"}) for s in big]
    return out + [Case("info_nce", shapes[0], dtype, "fwd", {"loss": "info_nce"})]


def cases(profile: str) -> list[Case]:
    losses = ("info_nce", "siglip", "supcon")
    return {
        "gpu": lambda: _profile([(16384, 768), (65536, 512), (4096, 512)], BF16, losses, big=[(262144, 512)]),
        "gpu-quick": lambda: _profile([(16384, 768), (65536, 512)], BF16, losses, big=[(262144, 512)]),
        "cpu": lambda: _profile([(1024, 128)], F32, losses),
        "cpu-quick": lambda: _profile([(512, 64)], F32, ("info_nce",)),
        "tiny": lambda: _profile([(19, 5)], F32, losses),
    }[profile]()


def grads(case: Case) -> tuple[str, ...]:
    return {"info_nce": ("input", "key", "log_scale"), "siglip": ("input", "key", "log_scale", "bias"),
            "supcon": ("input",)}[case.options["loss"]]


def make_inputs(case: Case, device, gen) -> dict:
    b, d = case.shape
    wants = case.mode == "fwd+bwd"
    log_scale, bias = INIT[case.options["loss"]]
    inputs = {"input": torch.randn(b, d, generator=gen, device=device, dtype=case.dtype).requires_grad_(wants),
              "key": torch.randn(b, d, generator=gen, device=device, dtype=case.dtype).requires_grad_(wants),
              "log_scale": torch.tensor(log_scale, device=device).requires_grad_(wants),
              "bias": torch.tensor(bias, device=device).requires_grad_(wants)}
    order = torch.randperm(b, generator=gen, device=device)
    inputs["labels"] = order // PER_CLASS
    return inputs


def bytes_model(case: Case) -> tuple[int, str]:
    b, d = case.shape
    size = torch.finfo(case.dtype).bits // 8
    n = b * d * (1 if case.options["loss"] == "supcon" else 2)
    if case.mode == "fwd":
        return n * size, "contrastive fwd: embeddings read once"
    return 2 * n * size, "contrastive fwd+bwd: embeddings read, their gradients written"


def flops_model(case: Case) -> tuple[int, str]:
    b, d = case.shape
    if case.mode == "fwd":
        return 2 * b * b * d, "fwd: 2*B*M*D (one similarity product)"
    return 8 * b * b * d, "fwd+bwd: 8*B*M*D (similarities, their recomputation, two gradient products)"


# ---- the textbook formulas (torch eager, torch.compile), in the inputs' dtype ----------------------

def eager_info_nce(q, k, scale):
    logits = scale.to(q.dtype) * (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T)
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def eager_siglip(q, k, scale, bias):
    logits = scale.to(q.dtype) * (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T) + bias.to(q.dtype)
    sign = 2 * torch.eye(*logits.shape, device=q.device, dtype=q.dtype) - 1
    return -F.logsigmoid(sign * logits).sum() / q.shape[0]


def eager_supcon(f, labels, temperature=TEMPERATURE):
    f = F.normalize(f, dim=1)
    logits = (f @ f.T) / temperature
    self_mask = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    n_pos = positive.sum(1)
    rows = -torch.where(positive, log_prob, 0).sum(1) / n_pos.clamp_min(1)
    return rows.sum() / (n_pos > 0).sum()  # rows without a positive are 0


def _too_big(case: Case):
    """Providers that hold the (B, B) logits (several copies in fwd+bwd) are not run where one copy
    in fp32 would take over a third of the GPU's memory."""
    b = case.shape[0]
    if torch.cuda.is_available():
        limit = torch.cuda.get_device_properties(0).total_memory / 3
        if b * b * 4 > limit:
            raise Unsupported(f"the ({b}, {b}) logits alone take {b * b * 4 / 2**30:.0f} GB")


def _bind_eager(case):
    _too_big(case)
    loss = case.options["loss"]
    if loss == "info_nce":
        return lambda x: eager_info_nce(x["input"], x["key"], x["log_scale"].exp())
    if loss == "siglip":
        return lambda x: eager_siglip(x["input"], x["key"], x["log_scale"].exp(), x["bias"])
    return lambda x: eager_supcon(x["input"], x["labels"])


def _lf_call(lf, case, x, backend):
    loss = case.options["loss"]
    if loss == "info_nce":
        return lf.info_nce(x["input"], x["key"], logit_scale=x["log_scale"].exp(), backend=backend)
    if loss == "siglip":
        return lf.siglip_loss(x["input"], x["key"], x["log_scale"].exp(), x["bias"], backend=backend)
    return lf.supcon_loss(x["input"], x["labels"], temperature=TEMPERATURE, backend=backend)


def reference(case, inputs):
    import lossforge_kernels as lf

    _too_big(case)
    return _lf_call(lf, case, inputs, "reference")


def _inf_cl(settings) -> Provider | str:
    cal_inf_loss = imported("inf_cl", "cal_inf_loss", settings, runs_on_cuda_only="Inf-CL")
    if isinstance(cal_inf_loss, str):
        return cal_inf_loss

    def bind(case):
        if case.options["loss"] != "info_nce":
            raise Unsupported("InfoNCE only")

        def call(x):
            q, k, scale = F.normalize(x["input"], dim=1), F.normalize(x["key"], dim=1), x["log_scale"].exp()
            rows = 0.5 * (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale))  # one call per direction
            return rows.mean()
        return call

    return Provider("inf_cl", bind)


def _open_clip(settings) -> Provider | str:
    loss_module = imported("open_clip", "loss", settings)
    if isinstance(loss_module, str):
        return loss_module

    def bind(case):
        _too_big(case)
        loss = case.options["loss"]
        if loss == "supcon":
            raise Unsupported("no SupCon")
        fn = loss_module.ClipLoss() if loss == "info_nce" else loss_module.SigLipLoss()

        def call(x):
            q, k = F.normalize(x["input"], dim=1), F.normalize(x["key"], dim=1)
            scale = x["log_scale"].exp()
            return fn(q, k, scale) if loss == "info_nce" else fn(q, k, scale, x["bias"])
        return call

    return Provider("open_clip", bind)


def providers(settings):
    return standard_providers(settings, _bind_eager, _lf_call, ("inf_cl", _inf_cl), ("open_clip", _open_clip))


ORDER = 40  # where `python -m bench` runs this suite among the others (lowest first)
SUITE = Suite("contrastive", cases, make_inputs, providers, reference, bytes_model,
              STANDARD_PROVIDERS + ("inf_cl", "open_clip"), grads=grads, flops_model=flops_model)

# Sigmoid (binary, per-element) focal loss with torchvision's semantics; soft targets in [0, 1] allowed.
#
# One program computes BLOCK consecutive elements of the flattened tensor (int64 offsets), in fp32.
# Forward: reads input and target once and writes either the elementwise loss, or (reduce) one fp32
# partial sum per program that torch then sums in a fixed order (deterministic, no atomics); when a
# gradient is wanted it is written in the same pass, times grad_factor (read on the device). Traffic per element for
# bf16: reduced forward 4 bytes, fused forward+gradient 6 bytes, one pass each. The backward op
# reads grad_out, input and target and writes the gradient, also one pass.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .math import log1p

# 8 elements per thread (16-byte loads for bf16); the fused variants need ~100+ registers per thread.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _focal_terms(x, t, alpha, gamma, HAS_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr):
    """Elementwise loss and d loss / dx. GAMMA_MODE: 0 gamma == 0, 2 gamma == 2, 1 any other gamma."""
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    pos = x >= 0.0
    p = tl.where(pos, inv, e * inv)
    p_neg = tl.where(pos, e * inv, inv)  # 1 - p without cancellation
    # BCE-with-logits, max(x, 0) - t x + log(1 + e^-|x|): for a finite x as (1 - t) x or -t x, without
    # the cancellation of torch's (1 - t) x + max(-x, 0) at x < 0 (1e-5 relative for x = -8, t = 0.002);
    # an infinite x takes torch's form, for torch's inf or NaN
    lin = tl.where(x >= 0.0, (1.0 - t) * x, -t * x)
    ce = tl.where(tl.abs(x) < float("inf"), lin, (1.0 - t) * x + tl.maximum(-x, 0.0)) + log1p(e)
    dce = p * (1.0 - t) - p_neg * t  # p - t, exact for hard targets
    if GAMMA_MODE == 0:
        loss = ce
        d = dce
    else:
        m = p * (1.0 - t) + p_neg * t  # 1 - p_t
        live = m > 0.0
        if GAMMA_MODE == 2:
            q = m * m
        else:
            q = tl.where(live, tl.exp(gamma * tl.log(tl.where(live, m, 1.0))), 0.0)
        # r = (dm/dx) / m = p (1 - p)(1 - 2t) / m, |r| <= 1; the gradient never forms m^(gamma - 1).
        r = (p * p_neg * (1.0 - 2.0 * t)) / tl.where(live, m, 1.0)
        loss = ce * q
        d = q * tl.where(live, dce + gamma * ce * r, dce)  # q = 0 where m = 0: no NaN from ce * r
    if HAS_ALPHA:
        a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss = a_t * loss
        d = a_t * d
    return loss, d


@triton.jit
def _sigmoid_focal_fwd_kernel(x_ptr, t_ptr, grad_factor_ptr, grad_ptr, out_ptr, n, alpha, gamma,
                              BLOCK: tl.constexpr, REDUCE: tl.constexpr, HAS_GRAD: tl.constexpr,
                              HAS_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    loss, d = _focal_terms(x, t, alpha, gamma, HAS_ALPHA, GAMMA_MODE)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD:
        tl.store(grad_ptr + offs, (d * tl.load(grad_factor_ptr)).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_focal_bwd_kernel(go_ptr, x_ptr, t_ptr, grad_ptr, n, alpha, gamma,
                              BLOCK: tl.constexpr, HAS_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, d = _focal_terms(x, t, alpha, gamma, HAS_ALPHA, GAMMA_MODE)
    tl.store(grad_ptr + offs, (go * d).to(grad_ptr.dtype.element_ty), mask=mask)


def _gamma_mode(gamma: float) -> int:
    return 0 if gamma == 0.0 else 2 if gamma == 2.0 else 1


def sigmoid_focal_fwd(input, target, grad_factor, out, grad, alpha, gamma, reduce):
    """The forward op (contract: lossforge_kernels/ops/sigmoid_focal.py, checked there)."""
    n = input.numel()
    if n == 0:
        if reduce:
            out.zero_()
        return
    programs = triton.cdiv(n, BLOCK)
    dest = torch.empty(programs, device=input.device, dtype=torch.float32) if reduce else out
    has_grad = grad is not None
    _sigmoid_focal_fwd_kernel[(programs,)](
        input, target, grad_factor if has_grad else dest, grad if has_grad else input, dest, n,
        float(alpha), float(gamma), BLOCK=BLOCK, REDUCE=bool(reduce), HAS_GRAD=has_grad,
        HAS_ALPHA=alpha >= 0.0, GAMMA_MODE=_gamma_mode(gamma), num_warps=NUM_WARPS)
    if reduce:
        torch.sum(dest, dim=0, out=out)  # one fp32 partial per program, summed in a fixed order


def sigmoid_focal_bwd(grad_out, input, target, grad, alpha, gamma):
    """The backward op (contract: lossforge_kernels/ops/sigmoid_focal.py, checked there)."""
    n = input.numel()
    if n == 0:
        return
    _sigmoid_focal_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        grad_out, input, target, grad, n, float(alpha), float(gamma), BLOCK=BLOCK, HAS_ALPHA=alpha >= 0.0,
        GAMMA_MODE=_gamma_mode(gamma), num_warps=NUM_WARPS)

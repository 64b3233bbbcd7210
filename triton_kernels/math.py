"""Device math helpers shared by the Triton kernels (Triton has no portable tanh or accurate log1p)."""
import torch
import triton
import triton.language as tl


@triton.jit
def log1p(u):
    """log(1 + u) accurate for small u (Goldberg: log(v) * u / (v - 1) with v = 1 + u rounded), u >= 0 finite."""
    v = 1.0 + u
    d = v - 1.0
    return tl.where(d == 0.0, u, tl.log(v) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def tanh_and_slope(z):
    """tanh(z) and 1 - tanh(z)^2, both to fp32 precision (tl has no portable tanh).

    With e = exp(-2|z|): tanh = (1 - e) / (1 + e), which cancels for small |z|, so |z| < 0.25 uses
    the odd Taylor series (truncation < 1e-8 relative); the slope 4e / (1 + e)^2 never cancels.
    """
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    th = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    th = tl.where(z < 0.0, -th, th)
    one_e = 1.0 + e
    return th, 4.0 * e / (one_e * one_e)


# How a product holds an fp32 operand: as it is, rounded to bf16 (a bf16 dot), or to tf32 (a tf32 dot
# on fp32 operands, whose hardware keeps 10 mantissa bits).
OPERAND_EXACT = tl.constexpr(0)
OPERAND_BF16 = tl.constexpr(1)
OPERAND_TF32 = tl.constexpr(2)


def operand_rounding(dtype) -> int:
    """The OPERAND_* value of the fp32 weights a gradient product takes beside rows of this dtype."""
    return {torch.bfloat16: OPERAND_BF16, torch.float16: OPERAND_TF32}.get(dtype, OPERAND_EXACT).value


@triton.jit
def as_operand(v, ROUND: tl.constexpr):
    """fp32 v as a product holds it, the same bits on a GPU and in the interpreter (whose casts
    truncate): bf16 to nearest even, tf32 (10 mantissa bits) to nearest, or as it is. A sum that must
    agree with the product (a normalisation's radial term, a row's own term) takes these values."""
    if ROUND == OPERAND_BF16:
        bits = v.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    if ROUND == OPERAND_TF32:
        bits = v.to(tl.int32, bitcast=True)
        return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return v

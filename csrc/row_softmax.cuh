// The row-softmax core of the kernels that reduce rows of logits: the online max and sum of
// exponentials per thread and its merge across a warp and a block, exp by subtraction, softcap, the
// softplus/log-odds helpers, softmax cross-entropy's per-row coefficients and gradient formula, and
// the running first moment of entropy rows (MomentAcc). Used by the cross-entropy, log-probs and
// distillation kernels; written for any kernel whose rows come from elsewhere too
// (matrix-product tiles of a fused linear cross-entropy, similarity tiles of InfoNCE). The names
// and formulas are those of lossforge_kernels/reference/row_softmax.py, where they are documented.
#pragma once

#include <cmath>

#include "common.cuh"

namespace lossforge {

// Per-row gradient: g_j = (coef * exp(y_j - off) - w_j * (cq1 * q_j + cq0)) * dy_j/dx_j for j != t,
// and gt for the target class. off is lse (or lse + log(1 - p_t) for focal rows, where the exp then
// yields r_j = p_j / (1 - p_t), which cannot overflow).
struct RowGrad {
  float off, coef, cq0, cq1, gt;
};

// exp(y - m) as 2^((y - m) log2e): subtracting first keeps full precision when y and m are large
// and close (y*log2e - m*log2e in one fma would not: at |y| ~ 1000 that costs 4e-5 relative).
__device__ __forceinline__ float exp_diff(float y, float m) { return fast_exp2((y - m) * kLog2e); }

// p = e^l of a log-probability l (0 for l = -inf).
__device__ __forceinline__ float exp_of(float l) { return fast_exp2(l * kLog2e); }

// Running max m of the row's logits, s = sum of exp(y - m) over the elements seen (target
// excluded), ys = sum of w_j (y_j - c) or w_j q'_j (y_j - c), qs = sum of w_j q'_j.
struct Acc {
  float m, s, ys, qs;
};

__device__ __forceinline__ Acc acc_init() { return {-INFINITY, 0.f, 0.f, 0.f}; }

template <bool kCap>
__device__ __forceinline__ float cap_logit(float x, float cap, float inv_cap) {
  if constexpr (kCap) {
    return cap * tanhf(x * inv_cap);
  } else {
    return x;
  }
}

// y and dy/dx = 1 - tanh^2.
template <bool kCap>
__device__ __forceinline__ float cap_logit_d(float x, float cap, float inv_cap, float& d) {
  if constexpr (kCap) {
    const float th = tanhf(x * inv_cap);
    d = fmaf(-th, th, 1.f);
    return cap * th;
  } else {
    d = 1.f;
    return x;
  }
}

template <int N>
__device__ __forceinline__ float tree_sum(float (&e)[N]) {
#pragma unroll
  for (int half = N / 2; half > 0; half /= 2) {
#pragma unroll
    for (int i = 0; i < half; ++i) e[i] += e[i + half];
  }
  return e[0];
}

// Adds N logits y (class weights w, probability targets q) to the running sums. `skip` is the index
// of the target class among them, or -1.
template <int N, bool kSoft, bool kSmooth, bool kWElem>
__device__ __forceinline__ void accumulate(Acc& a, const float* y, const float* w, const float* q, int skip, float c,
                                           float eps1, float epsC) {
  float vmax = y[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, y[i]);
  if (vmax > a.m) {  // s was relative to the old max (0 while it was -inf)
    a.s *= exp_diff(a.m, vmax);
    a.m = vmax;
  }
  // fmaxf drops NaN, so s carries it: exp(NaN - m) is NaN. A lone -inf logit adds nothing (-inf -
  // -inf would be NaN); a packet always adds, relative to 0 while the max is -inf, because a NaN
  // beside -inf logits leaves vmax at -inf.
  if (N > 1 || vmax != -INFINITY) {
    const float ms = N > 1 && a.m == -INFINITY ? 0.f : a.m;
    float e[N];
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = exp_diff(y[i], ms);
    if (skip >= 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = i == skip ? 0.f : e[i];
    }
    a.s += tree_sum<N>(e);
  }
  // Centred on c (a logit of the row) so that S*lse - sum q y does not cancel for large logits.
  if constexpr (kSoft) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float qq = (kWElem ? w[i] : 1.f) * fmaf(eps1, q[i], epsC);
      a.qs += qq;
      a.ys = fmaf(qq, y[i] - c, a.ys);
    }
  } else if constexpr (kSmooth) {
#pragma unroll
    for (int i = 0; i < N; ++i) a.ys += kWElem ? w[i] * (y[i] - c) : y[i] - c;
  }
}

__device__ __forceinline__ void merge(Acc& a, float m, float s, float ys, float qs) {
  const float mm = fmaxf(a.m, m);
  if (mm != -INFINITY) {
    a.s = a.s * exp_diff(a.m, mm) + s * exp_diff(m, mm);
    a.m = mm;
  } else {
    a.s += s;  // both maxima -inf: the sums are 0 (or NaN, which must survive)
  }
  a.ys += ys;
  a.qs += qs;
}

template <bool kSums, bool kQs>
__device__ __forceinline__ void warp_merge(Acc& a) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const float m = __shfl_xor_sync(0xffffffffu, a.m, off);
    const float s = __shfl_xor_sync(0xffffffffu, a.s, off);
    const float ys = kSums ? __shfl_xor_sync(0xffffffffu, a.ys, off) : 0.f;
    const float qs = kQs ? __shfl_xor_sync(0xffffffffu, a.qs, off) : 0.f;
    merge(a, m, s, ys, qs);
  }
}

struct ReduceSmem {
  float m[kMaxThreads / kWarpSize], s[kMaxThreads / kWarpSize];
  float ys[kMaxThreads / kWarpSize], qs[kMaxThreads / kWarpSize];
};

// The row's totals, valid in thread 0. The caller syncs before `sm` is written again.
template <bool kSums, bool kQs>
__device__ __forceinline__ Acc block_merge(Acc a, ReduceSmem& sm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  warp_merge<kSums, kQs>(a);
  if (lane == 0) {
    sm.m[warp] = a.m, sm.s[warp] = a.s, sm.ys[warp] = a.ys, sm.qs[warp] = a.qs;
  }
  __syncthreads();
  if (warp == 0) {
    a = acc_init();
    if (lane < static_cast<int>(blockDim.x / kWarpSize)) {
      a = {sm.m[lane], sm.s[lane], sm.ys[lane], sm.qs[lane]};
    }
    warp_merge<kSums, kQs>(a);
  }
  return a;
}

// log(1 + e^v), for any v (inf and NaN pass through: no fminf/fmaxf clamp, which would drop NaN).
__device__ __forceinline__ float softplus(float v) { return v > 0.f ? v + log1pf(expf(-v)) : log1pf(expf(v)); }

// (1 - p_t)^gamma from log(1 - p_t): 1 for gamma == 0, 0 when no other class has mass.
__device__ __forceinline__ float focal_q(float log1mp, float gamma) {
  return gamma == 0.f ? 1.f : expf(gamma * log1mp);
}

struct ClassRow {
  float wt, at, W, eps1, epsC, z, gamma;
};

// Gradient constants of a class-target row (see RowGrad), scaled by `scale`; dt = dy_t/dx_t.
__device__ __forceinline__ RowGrad class_row_grad(const ClassRow& r, float lse, float ce, float log1mp, float logp_t,
                                                  float scale, float dt) {
  const float q = focal_q(log1mp, r.gamma), F = r.at * q;
  const float pt = expf(logp_t), omp = expf(log1mp);  // omp = 1 - p_t without cancellation
  const float cp = F * fmaf(r.eps1, r.wt, r.epsC * r.W) + 2.f * r.z * lse;  // coefficient of p_j
  const float dF = r.gamma > 0.f ? r.at * r.gamma * q * pt : 0.f;          // -dF/dy_t = dF/dr_j
  // CE * dF/dy; dropped when dF is 0 so that an infinite CE (target logit -inf) gives no 0 * inf.
  const float ce_dF = dF != 0.f ? ce * dF : 0.f;
  RowGrad g;
  if (r.gamma > 0.f && log1mp > -INFINITY) {  // via r_j: p_j = r_j * (1 - p_t)
    g.off = lse + log1mp;
    g.coef = scale * fmaf(cp, omp, ce_dF);
  } else {
    g.off = lse;
    g.coef = scale * cp;
  }
  g.cq0 = scale * F * r.epsC;
  g.cq1 = 0.f;
  g.gt = scale * dt * (F * fmaf(-r.eps1 * r.wt, omp, r.epsC * fmaf(r.W, pt, -r.wt)) - ce_dF + 2.f * r.z * lse * pt);
  return g;
}

__device__ __forceinline__ RowGrad soft_row_grad(float lse, float S, float eps1, float epsC, float z, float scale) {
  RowGrad g;
  g.off = lse;
  g.coef = scale * fmaf(2.f * z, lse, S);
  g.cq1 = scale * eps1;
  g.cq0 = scale * epsC;
  g.gt = 0.f;
  return g;
}

// The lse of a class-target row from its max m, the sum s_excl of exp(y - m) over every class but
// the target, and the target's logit y_t. m = -inf (an all -inf row, or a NaN y_t beside only -inf,
// which fmaxf dropped) subtracts 0: e_t is then 0, or NaN.
__device__ __forceinline__ float class_row_lse(float m, float s_excl, float y_t) {
  const float e_t = exp_diff(y_t, m == -INFINITY ? 0.f : m);
  return m + logf(s_excl + e_t);
}

// From lr = log(s_excl / e_t), the log-odds against the target: nll_t = -log p_t = softplus(lr) and
// log(1 - p_t) = -softplus(-lr), with no cancellation as p_t -> 1 (a confident row's tiny CE keeps
// its relative precision). s_excl = 0 (no other class has mass) gives log(1 - p_t) = -inf.
// nll_t (= -logp_t) spares callers a double negation, and the lse is a function of its own
// (class_row_lse): written either other way, the compiler contracts and shares differently and the
// kernels' code changes.
struct TargetLogProbs {
  float logp_t, log1mp, nll_t;
};

__device__ __forceinline__ TargetLogProbs target_log_probs(float m, float s_excl, float y_t) {
  const float lr = logf(s_excl) - (y_t - m);
  const float nll_t = softplus(lr);
  return {-nll_t, -softplus(-lr), nll_t};
}


// Entropy rows (reference/row_softmax.py): beside the running max m and s = sum e^(y - m), the
// first moment u = sum e^(y - m) (y - m), so that the entropy log s - u / s is a sum of two
// non-negative terms (no cancellation at large logits).
struct MomentAcc {
  float m, s, u;
};

__device__ __forceinline__ MomentAcc moment_init() { return {-INFINITY, 0.f, 0.f}; }

// (s, u) relative to max m, re-expressed relative to mm >= m: when the max grows by d,
// s <- s e^-d and u <- (u - d s) e^-d. Sums of an empty part (m = -inf) are 0, or NaN, relative to
// any max (and a +inf max has made s NaN already).
__device__ __forceinline__ void moment_rescale(float m, float mm, float& s, float& u) {
  if (m == -INFINITY || m == mm) return;
  const float r = exp_diff(m, mm);
  u = (u - (mm - m) * s) * r;
  s *= r;
}

// Adds N logits y. While the max is -inf (nothing but -inf or NaN seen) the terms are relative to
// 0: -inf adds 0 to both sums (not 0 * -inf to u), NaN adds NaN (fmaxf dropped it from the max).
template <int N>
__device__ __forceinline__ void accumulate_moment(MomentAcc& a, const float (&y)[N]) {
  float vmax = y[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, y[i]);
  if (vmax > a.m) {
    moment_rescale(a.m, vmax, a.s, a.u);
    a.m = vmax;
  }
  const float ms = a.m == -INFINITY ? 0.f : a.m;
  float e[N], f[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    e[i] = exp_diff(y[i], ms);
    f[i] = e[i] == 0.f ? 0.f : e[i] * (y[i] - ms);
  }
  a.s += tree_sum<N>(e);
  a.u += tree_sum<N>(f);
}

__device__ __forceinline__ void merge_moment(MomentAcc& a, MomentAcc b) {
  const float mm = fmaxf(a.m, b.m);
  moment_rescale(a.m, mm, a.s, a.u);
  moment_rescale(b.m, mm, b.s, b.u);
  a = {mm, a.s + b.s, a.u + b.u};
}

__device__ __forceinline__ void warp_merge_moment(MomentAcc& a) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    merge_moment(a, {__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off),
                     __shfl_xor_sync(0xffffffffu, a.u, off)});
  }
}

// The row's totals, valid in thread 0 (ReduceSmem's ys holds u). The caller syncs before `sm` is
// written again.
__device__ __forceinline__ MomentAcc block_merge_moment(MomentAcc a, ReduceSmem& sm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  warp_merge_moment(a);
  if (lane == 0) sm.m[warp] = a.m, sm.s[warp] = a.s, sm.ys[warp] = a.u;
  __syncthreads();
  if (warp == 0) {
    a = moment_init();
    if (lane < static_cast<int>(blockDim.x / kWarpSize)) a = {sm.m[lane], sm.s[lane], sm.ys[lane]};
    warp_merge_moment(a);
  }
  return a;
}

}  // namespace lossforge

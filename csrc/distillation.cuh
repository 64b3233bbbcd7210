// Divergences between a student's and a teacher's softmax over (M, V) logit rows at a temperature T
// (the contract is ops/distillation.py's docstring; the per-element formulas those of
// triton_kernels/distillation.py).
//
// One thread block owns one row of both heads at a time (zs = student / T, zt = teacher / T; grid-
// stride over rows), read side by side in 16-byte packets of the student's alignment (the teacher's
// 16 bytes at a time where its alignment matches, else element by element).
//   Pass 1: the online max and sum of exponentials of each head (row_softmax.cuh's Acc).
//   Pass 2: the divergence's terms from the exact log-probabilities ls = (zs - ms) - log ss and
//   lt = (zt - mt) - log st (no cancellation of large lse's), and Gbar = sum_j ps_j G_j:
//     kl          pt (lt - ls)                    d/dzs: ps - pt
//     reverse_kl  ps (ls - lt)                    d/dzs: ps (G - Gbar), G = ls - lt
//     jsd         beta pt (lt - lm) + (1 - beta) ps (ls - lm), lm = log(beta pt + (1 - beta) ps)
//                                                 d/dzs: ps (G - Gbar), G = (1 - beta)(ls - lm)
//   p log p terms are 0 where p is 0.
//   Pass 3 (a gradient wanted): writes the gradient times grad_factor / T, each packet loaded before
//   it is stored (the gradient may be the student's logits). The backward kernel is pass 3 alone,
//   from the saved [ms, log ss, mt, log st, Gbar] and the row's grad_output.
// Masked rows (target == ignore_index) are not read: loss, stats and gradient 0. Designed traffic per
// logit of each head: forward 2 reads (4 B bf16), with the gradient 3 reads + 1 write of the
// student's (8 B bf16) and 3 reads of the teacher's (6 B); backward 1 read of each + 1 write.
// 2 packets of each head in flight per thread. The second and third reads come from L2 only while
// the rows in flight fit it (at V = 151936 in bf16, 4 blocks per SM of two 297 KiB rows do not);
// keeping the rows' heads in shared memory between passes, as cross_entropy.cuh does, would help there.
// Compile facts (nvcc 13.0, -O3, ptxas -v, sm_80 and sm_90): no spills, no stack frame; forward 48-64
// registers (64 for every fp16/bf16 one) and 1300 B of static shared memory, backward 50-60.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "enums.h"
#include "row_softmax.cuh"

namespace lossforge {
namespace distillation {

constexpr int kUnroll = 2;  // 16-byte packets of each head in flight per thread

struct Args {
  const void* s;
  int64_t ss;
  const void* t;
  int64_t st;
  const int64_t* target;  // or nullptr: every row counts
  const float* scale;     // forward: the 0-dim grad_factor; backward: grad_rows (one per row)
  float* loss;
  float* stats;  // (M, 5) [ms, log ss, mt, log st, Gbar]
  void* grad;
  int64_t sg;
  int64_t rows, V, ignore;
  float inv_t, beta, log_beta, log_1mb;
};

struct RowStats {
  float ms, log_ss, mt, log_st, gbar;
};

// f(j, zs, zt) over the two rows, as common.cuh's walk_row does over one (z already divided by T).
template <typename T, bool kKeep, typename F>
__device__ __forceinline__ void walk_pair(const T* s, const T* t, int64_t V, float inv_t, F&& f) {
  constexpr int kN = Elem<T>::kPerPacket;
  const bool t_vec = same_phase(s, t);
  struct Pair {
    uint4 s, t;
  };
  const RowSplit<T> rs(s, V);
  auto scalar = [&](int64_t j) {
    float zs[1] = {load_elem(s + j) * inv_t}, zt[1] = {load_elem(t + j) * inv_t};
    f(j, zs, zt);
  };
  if (threadIdx.x < rs.head) scalar(threadIdx.x);
  if (rs.body_end + threadIdx.x < V) scalar(rs.body_end + threadIdx.x);
  auto load = [&](int64_t k) {
    const int64_t j0 = rs.first(k);
    return Pair{load_raw<T, kKeep>(s + j0, true), load_raw<T, kKeep>(t + j0, t_vec)};
  };
  auto use = [&](int64_t k, const Pair& p) {
    float zs[kN], zt[kN];
    unpack<T>(p.s, zs);
    unpack<T>(p.t, zt);
#pragma unroll
    for (int i = 0; i < kN; ++i) zs[i] *= inv_t, zt[i] *= inv_t;
    f(rs.first(k), zs, zt);
  };
  stream_packets<kUnroll>(threadIdx.x, rs.packets, blockDim.x, load, use);
}

// p (la - lb), 0 where p is 0 (not 0 * inf).
__device__ __forceinline__ float p_log_ratio(float p, float la, float lb) { return p == 0.f ? 0.f : p * (la - lb); }

// lm = log(beta pt + (1 - beta) ps) from the log-probabilities, exact where either is tiny. The
// smaller one is (x + y) - max, not a fminf: fmaxf and fminf drop a NaN, the sum keeps it.
__device__ __forceinline__ float log_mix(float ls, float lt, const Args& a) {
  const float x = lt + a.log_beta, y = ls + a.log_1mb, hi = fmaxf(x, y);
  return hi == -INFINITY ? -INFINITY : hi + log1pf(exp_diff((x + y) - hi, hi));
}

// One element's divergence term d and its ps G (for Gbar).
template <int kKind>
__device__ __forceinline__ void terms(float ls, float lt, const Args& a, float& d, float& w) {
  if constexpr (kKind == kKl) {
    d = p_log_ratio(exp_of(lt), lt, ls);
    w = 0.f;
  } else if constexpr (kKind == kReverseKl) {
    d = w = p_log_ratio(exp_of(ls), ls, lt);
  } else {
    const float lm = log_mix(ls, lt, a);
    w = (1.f - a.beta) * p_log_ratio(exp_of(ls), ls, lm);
    d = fmaf(a.beta, p_log_ratio(exp_of(lt), lt, lm), w);
  }
}

// d(divergence)/d(zs) of one element.
template <int kKind>
__device__ __forceinline__ float grad_of(float ls, float lt, float gbar, const Args& a) {
  const float ps = exp_of(ls);
  if constexpr (kKind == kKl) return ps - exp_of(lt);
  const float G = kKind == kReverseKl ? ls - lt : (1.f - a.beta) * (ls - log_mix(ls, lt, a));
  return ps == 0.f ? 0.f : ps * (G - gbar);
}

__device__ __forceinline__ bool counted(const Args& a, int64_t row) {
  return a.target == nullptr || a.target[row] != a.ignore;
}

// Pass 3: scale * d(divergence)/d(zs) over the row (scale includes 1/T).
template <typename T, int kKind>
__device__ __forceinline__ void write_grad_row(const Args& a, const T* s, const T* t, T* g, const RowStats& r,
                                               float scale) {
  const bool g_vec = same_phase(g, s);
  walk_pair<T, false>(s, t, a.V, a.inv_t, [&](int64_t j0, auto& zs, auto& zt) {
    constexpr int n = sizeof(zs) / sizeof(float);
#pragma unroll
    for (int i = 0; i < n; ++i) {
      zs[i] = scale * grad_of<kKind>((zs[i] - r.ms) - r.log_ss, (zt[i] - r.mt) - r.log_st, r.gbar, a);
    }
    store_vals<T>(g + j0, g_vec, zs);
  });
}

template <typename T, int kKind, bool kGrad>
__global__ void __launch_bounds__(kMaxThreads, 1) distillation_fwd_kernel(const Args a) {
  __shared__ ReduceSmem red_s, red_t;
  __shared__ float sums[2][kMaxThreads / kWarpSize];
  __shared__ RowStats shared_stats;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* s = static_cast<const T*>(a.s) + row * a.ss;
    const T* t = static_cast<const T*>(a.t) + row * a.st;
    T* g = kGrad ? static_cast<T*>(a.grad) + row * a.sg : nullptr;
    float* stats = a.stats + 5 * row;
    if (!counted(a, row)) {
      if (threadIdx.x == 0) a.loss[row] = stats[0] = stats[1] = stats[2] = stats[3] = stats[4] = 0.f;
      if constexpr (kGrad) fill_row(g, a.V, 0.f, threadIdx.x, blockDim.x);
      continue;
    }
    // ---- pass 1 ----
    Acc as = acc_init(), at = acc_init();
    walk_pair<T, true>(s, t, a.V, a.inv_t, [&](int64_t, auto& zs, auto& zt) {
      constexpr int n = sizeof(zs) / sizeof(float);
      accumulate<n, false, false, false>(as, zs, nullptr, nullptr, -1, 0.f, 0.f, 0.f);
      accumulate<n, false, false, false>(at, zt, nullptr, nullptr, -1, 0.f, 0.f, 0.f);
    });
    as = block_merge<false, false>(as, red_s);
    at = block_merge<false, false>(at, red_t);
    if (threadIdx.x == 0) shared_stats = {as.m, logf(as.s), at.m, logf(at.s), 0.f};
    __syncthreads();
    RowStats r = shared_stats;
    // ---- pass 2 ----
    float d_sum = 0.f, w_sum = 0.f;
    walk_pair<T, kGrad>(s, t, a.V, a.inv_t, [&](int64_t, auto& zs, auto& zt) {
      constexpr int n = sizeof(zs) / sizeof(float);
#pragma unroll
      for (int i = 0; i < n; ++i) {
        float d, w;
        terms<kKind>((zs[i] - r.ms) - r.log_ss, (zt[i] - r.mt) - r.log_st, a, d, w);
        d_sum += d;
        w_sum += w;
      }
    });
    d_sum = block_sum(d_sum, sums[0]);
    w_sum = block_sum(w_sum, sums[1]);
    if (threadIdx.x == 0) {
      a.loss[row] = d_sum;
      stats[0] = r.ms, stats[1] = r.log_ss, stats[2] = r.mt, stats[3] = r.log_st, stats[4] = w_sum;
      shared_stats.gbar = w_sum;
    }
    __syncthreads();  // Gbar is ready, and the scratch may be written by the next row
    // ---- pass 3 ----
    if constexpr (kGrad) {
      r.gbar = shared_stats.gbar;
      write_grad_row<T, kKind>(a, s, t, g, r, *a.scale * a.inv_t);
      __syncthreads();  // every thread has read shared_stats before the next row writes it
    }
  }
}

template <typename T, int kKind>
__global__ void __launch_bounds__(kMaxThreads, 1) distillation_bwd_kernel(const Args a) {
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* g = static_cast<T*>(a.grad) + row * a.sg;
    if (!counted(a, row)) {
      fill_row(g, a.V, 0.f, threadIdx.x, blockDim.x);
      continue;
    }
    const float* st = a.stats + 5 * row;
    const RowStats r{st[0], st[1], st[2], st[3], st[4]};
    write_grad_row<T, kKind>(a, static_cast<const T*>(a.s) + row * a.ss, static_cast<const T*>(a.t) + row * a.st, g,
                             r, a.scale[row] * a.inv_t);
  }
}

}  // namespace distillation
}  // namespace lossforge

// Softmax cross-entropy kernels: class weights, label smoothing, focal modulation, z-loss, softcap,
// class-index or class-probability targets (the contract is ops/cross_entropy.py's docstring).
//
// One thread block owns one row of C logits at a time (grid-stride over rows).
//   Pass 1 streams the row once: per thread an online max and sum of exp (rescaled when the max
//   grows; the target's term is kept out of the sum so that 1 - p_t keeps its relative precision)
//   plus the sums the options need; the partials are merged with warp shuffles and shared memory,
//   and thread 0 writes the row's loss and stats.
//   Pass 2 (forward with a gradient buffer) reads the row again and writes the gradient. The first
//   `cache_packets` 16-byte packets of the row stay in dynamic shared memory from pass 1; the rest
//   is re-read from L2 (plan_rows keeps the rows in flight small enough for that).
//   Optionally (plan_rows' prefetch, off by default until measured) the grid is persistent and a
//   block that has read its row asks L2 for the head of its next row, so that DRAM keeps reading
//   while the block reduces and writes the gradient.
// The backward kernel is pass 2 alone, driven by the saved stats (no second reduction).
// Designed traffic per logit: forward 1 read (2 B bf16); forward with gradient 1 read + 1 write
// (4 B bf16); backward 1 read + 1 write. 16-byte accesses, 4 packets in flight per thread (2 with
// softcap, per-class weights in the row loop or probability targets; 1 with both of the last two).
// Options are template flags, so the plain case compiles to the plain loop. Each
// cross_entropy_<dtype>.cu instantiates ce_kernel_table for one dtype (30 kernels), so that the
// dtypes compile in parallel; this header includes no ATen headers, which keeps those files cheap.
// Compile facts (nvcc 13.0, -O3, ptxas -v): all 90 kernels fit 64 registers
// (__launch_bounds__(1024, 1)) with no spills and no stack frame on sm_80 and sm_90; the plain bf16
// forward with gradient uses 64 registers, the forward alone 63, the backward 59 (sm_80) / 62 (sm_90).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "cross_entropy.h"
#include "row_softmax.cuh"

namespace lossforge {

// What each 16-byte packet of a row's logits is read with: the probability targets and class
// weights of its classes, each read 16 bytes at a time when its alignment matches the row walk's.
template <typename T, bool kSoft, bool kWElem>
struct RowSide {
  struct Packet {
    uint4 x, q;
    float w[kWElem ? Elem<T>::kPerPacket : 1];
  };
  const T* q;
  const float* const& w;  // the kernel argument itself, read where it is used
  bool q_vec, w_vec;

  __device__ __forceinline__ RowSide(const T* x, const T* q_, const float* const& w_, const RowSplit<T>& rs)
      : q(q_), w(w_), q_vec(kSoft && same_phase(q_, x)),
        w_vec(kWElem && (reinterpret_cast<uintptr_t>(w_ + rs.head) & 15u) == 0) {}

  // The packet at element j0, its logits `x` already loaded; kKeepQ: the targets stay in L2 for
  // a second pass.
  template <bool kKeepQ = false>
  __device__ __forceinline__ Packet with(const uint4& x, int64_t j0) const {
    Packet p;
    p.x = x;
    if constexpr (kSoft) p.q = load_raw<T, kKeepQ>(q + j0, q_vec);
    if constexpr (kWElem) load_floats<Elem<T>::kPerPacket>(w + j0, w_vec, p.w);
    return p;
  }
};

// Pass 2: the gradient of one row. Packets k < cached come from `cache` (shared memory).
template <typename T, bool kSoft, bool kSmooth, bool kWElem, bool kCap, int kU>
__device__ __forceinline__ void write_grad_row(const CeArgs& a, const T* x, const T* q, T* g, const RowSplit<T>& rs,
                                               int64_t cached, const uint4* cache, const RowGrad& rg, int64_t t) {
  constexpr int kN = Elem<T>::kPerPacket;
  const int tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const bool g_vec = same_phase(g, x);
  const RowSide<T, kSoft, kWElem> side(x, q, a.weight, rs);

  auto grad_of = [&](float xv, float wv, float qv) {
    float d;
    const float y = cap_logit_d<kCap>(xv, a.cap, a.inv_cap, d);
    float gv = rg.coef * exp_diff(y, rg.off);
    if constexpr (kSoft) {
      gv -= wv * fmaf(rg.cq1, qv, rg.cq0);
    } else if constexpr (kSmooth) {
      gv -= wv * rg.cq0;
    }
    if constexpr (kCap) gv *= d;
    return gv;
  };

  auto scalar = [&](int64_t j) {
    float gv = rg.gt;
    if (j != t) gv = grad_of(load_elem(x + j), kWElem ? __ldg(a.weight + j) : 1.f, kSoft ? load_elem(q + j) : 0.f);
    store_elem(g + j, gv);
  };
  if (tid < rs.head) scalar(tid);
  if (rs.body_end + tid < a.C) scalar(rs.body_end + tid);

  auto from_smem = [&](int64_t k) { return side.with(cache[k], rs.first(k)); };
  auto from_global = [&](int64_t k) {
    const int64_t j0 = rs.first(k);
    return side.with(ld_once(x + j0), j0);
  };
  auto use = [&](int64_t k, const typename RowSide<T, kSoft, kWElem>::Packet& in) {
    const int64_t j0 = rs.first(k);
    float v[kN], qv[kN];
    unpack<T>(in.x, v);
    if constexpr (kSoft) unpack<T>(in.q, qv);
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = grad_of(v[i], kWElem ? in.w[i] : 1.f, kSoft ? qv[i] : 0.f);
    if (!kSoft && static_cast<uint64_t>(t - j0) < static_cast<uint64_t>(kN)) {
      const int ti = static_cast<int>(t - j0);
#pragma unroll
      for (int i = 0; i < kN; ++i) v[i] = i == ti ? rg.gt : v[i];
    }
    store_packet<T>(g + j0, g_vec, v);
  };
  const int64_t k = stream_packets<kU>(tid, cached, nt, from_smem, use);
  stream_packets<kU>(k, rs.packets, nt, from_global, use);
}

// Per-row inputs of a class-target row. Returns false (after writing the row's outputs) for an
// ignored row or an out-of-range target, whose logits are never read.
template <typename T, bool kGrad, bool kCap>
__device__ __forceinline__ bool class_row_start(const CeArgs& a, int64_t row, const T* x, T* g, int64_t& t,
                                                float& yt, float& wt, float& at, bool write_stats) {
  t = a.target[row];
  if (t == a.ignore || t < 0 || t >= a.C) {
    const float v = t == a.ignore ? 0.f : NAN;
    if (threadIdx.x == 0 && write_stats) {
      a.loss[row] = v;
      *reinterpret_cast<float4*>(a.stats + 4 * row) = make_float4(v, v, v, v);
    }
    if constexpr (kGrad) fill_row(g, a.C, v, threadIdx.x, blockDim.x);
    return false;
  }
  yt = cap_logit<kCap>(load_elem(x + t), a.cap, a.inv_cap);
  wt = a.weight ? __ldg(a.weight + t) : 1.f;
  at = a.alpha ? __ldg(a.alpha + t) : a.alpha_f;
  return true;
}

template <typename T, bool kSoft, bool kSmooth, bool kWElem, bool kCap, bool kGrad>
__global__ void __launch_bounds__(kMaxThreads, 1) ce_fwd_kernel(const CeArgs a) {
  constexpr int kN = Elem<T>::kPerPacket;
  constexpr int kU = unroll_for(kSoft, kWElem, kCap);
  LOSSFORGE_DYNAMIC_SMEM(uint4, cache);
  __shared__ ReduceSmem red;
  __shared__ RowGrad shared_rg;
  const int tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const float eps1 = 1.f - a.label_smoothing, epsC = a.label_smoothing / static_cast<float>(a.C);
  const float W = a.weight_sum ? *a.weight_sum : static_cast<float>(a.C);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.sx;
    const T* q = kSoft ? static_cast<const T*>(a.prob) + row * a.sq : nullptr;
    T* g = kGrad ? static_cast<T*>(a.grad) + row * a.sg : nullptr;
    int64_t t = -1;
    float yt = 0.f, wt = 1.f, at = 1.f;
    if constexpr (!kSoft) {
      if (!class_row_start<T, kGrad, kCap>(a, row, x, g, t, yt, wt, at, true)) continue;
    }
    float c = 0.f;
    if constexpr (kSoft || kSmooth) {
      c = cap_logit<kCap>(load_elem(x), a.cap, a.inv_cap);
      if (!isfinite(c)) c = 0.f;
    }

    // ---- pass 1 ----
    const RowSplit<T> rs(x, a.C);
    const RowSide<T, kSoft, kWElem> side(x, q, a.weight, rs);
    const int64_t cached = !kGrad ? 0 : a.cache_packets < rs.packets ? a.cache_packets : rs.packets;
    Acc acc = acc_init();

    auto scalar = [&](int64_t j) {
      const float y = cap_logit<kCap>(load_elem(x + j), a.cap, a.inv_cap);
      const float w = kWElem ? __ldg(a.weight + j) : 1.f;
      const float qv = kSoft ? load_elem(q + j) : 0.f;
      accumulate<1, kSoft, kSmooth, kWElem>(acc, &y, &w, &qv, j == t ? 0 : -1, c, eps1, epsC);
    };
    if (tid < rs.head) scalar(tid);
    if (rs.body_end + tid < a.C) scalar(rs.body_end + tid);

    using Packet = typename RowSide<T, kSoft, kWElem>::Packet;
    // Packets that go to shared memory are not needed in L2 again; the others are re-read from it.
    auto load_to_smem = [&](int64_t k) {
      const int64_t j0 = rs.first(k);
      return side.template with<kGrad>(ld_once(x + j0), j0);
    };
    auto load_keep = [&](int64_t k) {
      const int64_t j0 = rs.first(k);
      return side.template with<kGrad>(kGrad ? ld_keep(x + j0) : ld_once(x + j0), j0);
    };
    auto use = [&](int64_t k, const Packet& in) {
      const int64_t j0 = rs.first(k);
      float y[kN], qv[kN];
      unpack<T>(in.x, y);
      if constexpr (kSoft) unpack<T>(in.q, qv);
      if constexpr (kCap) {
#pragma unroll
        for (int i = 0; i < kN; ++i) y[i] = cap_logit<kCap>(y[i], a.cap, a.inv_cap);
      }
      const int skip = (!kSoft && static_cast<uint64_t>(t - j0) < static_cast<uint64_t>(kN)) ? static_cast<int>(t - j0) : -1;
      accumulate<kN, kSoft, kSmooth, kWElem>(acc, y, in.w, qv, skip, c, eps1, epsC);
    };
    auto use_and_keep = [&](int64_t k, const Packet& in) {
      cache[k] = in.x;
      use(k, in);
    };
    const int64_t k = stream_packets<kU>(tid, cached, nt, load_to_smem, use_and_keep);
    stream_packets<kU>(k, rs.packets, nt, load_keep, use);
    if (a.prefetch_bytes > 0 && row + gridDim.x < a.rows) {
      prefetch_l2(x + gridDim.x * a.sx, min(a.prefetch_bytes, a.C * static_cast<int64_t>(sizeof(T))));
    }

    acc = block_merge<kSoft || kSmooth, kSoft>(acc, red);
    if (tid == 0) {
      RowGrad rg;
      const float scale = kGrad ? *a.scale : 0.f;
      if constexpr (kSoft) {
        const float lse = acc.m + logf(acc.s);
        a.loss[row] = acc.qs * (lse - c) - acc.ys + a.z * lse * lse;
        *reinterpret_cast<float4*>(a.stats + 4 * row) = make_float4(lse, acc.qs, 0.f, 0.f);
        rg = soft_row_grad(lse, acc.qs, eps1, epsC, a.z, scale);
      } else {
        const float lse = class_row_lse(acc.m, acc.s, yt);
        const TargetLogProbs lp = target_log_probs(acc.m, acc.s, yt);
        const float logp_t = lp.logp_t, log1mp = lp.log1mp;
        float ce = eps1 * wt * lp.nll_t;
        if constexpr (kSmooth) ce += epsC * fmaf(W, lse - c, -acc.ys);
        const ClassRow cr{wt, at, W, eps1, epsC, a.z, a.gamma};
        a.loss[row] = at * focal_q(log1mp, a.gamma) * ce + a.z * lse * lse;
        *reinterpret_cast<float4*>(a.stats + 4 * row) = make_float4(lse, ce, log1mp, logp_t);
        if constexpr (kGrad) {
          float dt = 1.f;
          if constexpr (kCap) {
            const float th = yt * a.inv_cap;
            dt = fmaf(-th, th, 1.f);
          }
          rg = class_row_grad(cr, lse, ce, log1mp, logp_t, scale, dt);
        }
      }
      if constexpr (kGrad) shared_rg = rg;
    }
    __syncthreads();  // shared_rg is ready, and `red` may be written by the next row

    // ---- pass 2 ----
    if constexpr (kGrad) {
      const RowGrad rg = shared_rg;
      write_grad_row<T, kSoft, kSmooth, kWElem, kCap, kU>(a, x, q, g, rs, cached, cache, rg, t);
    }
  }
}

template <typename T, bool kSoft, bool kSmooth, bool kWElem, bool kCap>
__global__ void __launch_bounds__(kMaxThreads, 1) ce_bwd_kernel(const CeArgs a) {
  constexpr int kU = unroll_for(kSoft, kWElem, kCap);
  const float eps1 = 1.f - a.label_smoothing, epsC = a.label_smoothing / static_cast<float>(a.C);
  const float W = a.weight_sum ? *a.weight_sum : static_cast<float>(a.C);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.sx;
    const T* q = kSoft ? static_cast<const T*>(a.prob) + row * a.sq : nullptr;
    T* g = static_cast<T*>(a.grad) + row * a.sg;
    const float* st4 = a.stats + 4 * row;  // a caller's tensor: not assumed 16-byte aligned
    const float4 st = make_float4(st4[0], st4[1], st4[2], st4[3]);
    const float scale = a.scale[row];
    int64_t t = -1;
    RowGrad rg;
    if constexpr (kSoft) {
      rg = soft_row_grad(st.x, st.y, eps1, epsC, a.z, scale);
    } else {
      float yt = 0.f, wt = 1.f, at = 1.f;
      if (!class_row_start<T, true, kCap>(a, row, x, g, t, yt, wt, at, false)) continue;
      float dt = 1.f;
      if constexpr (kCap) {
        const float th = yt * a.inv_cap;
        dt = fmaf(-th, th, 1.f);
      }
      const ClassRow cr{wt, at, W, eps1, epsC, a.z, a.gamma};
      rg = class_row_grad(cr, st.x, st.y, st.z, st.w, scale, dt);
    }
    const RowSplit<T> rs(x, a.C);
    write_grad_row<T, kSoft, kSmooth, kWElem, kCap, kU>(a, x, q, g, rs, 0, nullptr, rg, t);
  }
}

// The forward (without and with a gradient) and backward kernels of one option set.
template <typename T, bool kSoft, bool kSmooth, bool kWElem, bool kCap>
CeKernels ce_kernels() {
  return {&ce_fwd_kernel<T, kSoft, kSmooth, kWElem, kCap, false>, &ce_fwd_kernel<T, kSoft, kSmooth, kWElem, kCap, true>,
          &ce_bwd_kernel<T, kSoft, kSmooth, kWElem, kCap>, unroll_for(kSoft, kWElem, kCap), Elem<T>::kPerPacket};
}

template <typename T>
const CeKernelTable& ce_kernel_table() {
  static const CeKernelTable table{
      {{ce_kernels<T, true, false, false, false>(), ce_kernels<T, true, false, false, true>()},
       {ce_kernels<T, true, false, true, false>(), ce_kernels<T, true, false, true, true>()}},
      {ce_kernels<T, false, false, false, false>(), ce_kernels<T, false, false, false, true>()},
      {{ce_kernels<T, false, true, false, false>(), ce_kernels<T, false, true, false, true>()},
       {ce_kernels<T, false, true, true, false>(), ce_kernels<T, false, true, true, true>()}}};
  return table;
}

}  // namespace lossforge

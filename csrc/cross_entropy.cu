// Softmax cross-entropy family: class weights, label smoothing, focal modulation, z-loss, softcap,
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
// The backward op is pass 2 alone, driven by the saved stats (no second reduction).
// Designed traffic per logit: forward 1 read (2 B bf16); forward with gradient 1 read + 1 write
// (4 B bf16); backward 1 read + 1 write. 16-byte accesses, 4 packets in flight per thread (2 with
// softcap, per-class weights in the row loop or probability targets; 1 with both of the last two).
// Options are template flags, so the plain case compiles to the plain loop.
// Compile facts (nvcc 13.0, -O3, ptxas -v): all 90 instantiations fit 64 registers
// (__launch_bounds__(1024, 1)) with no spills and no stack frame on sm_80 and sm_90; the plain bf16
// forward with gradient uses 64 registers, the forward alone 63, the backward 59 (sm_80) / 62 (sm_90).

#include <cmath>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace lossforge {
namespace {

// 16-byte packets of logits in flight per thread: fewer when each also brings targets and weights,
// or needs the registers of tanh.
constexpr int unroll_for(bool soft, bool welem, bool cap) {
  return soft && welem ? 1 : soft || welem || cap ? 2 : 4;
}

struct CeArgs {
  const void* x;
  int64_t sx;
  const int64_t* target;  // class indices, or nullptr for probability targets
  const void* prob;       // probability targets (logits' dtype)
  int64_t sq;
  const float* weight;      // (C,) or nullptr
  const float* alpha;       // (C,) or nullptr
  const float* weight_sum;  // sum of weight (device), when smoothing with weights
  void* grad;
  int64_t sg;
  float* loss;
  float* stats;
  const float* scale;  // forward: 0-dim grad_scale; backward: grad_rows (one per row)
  int64_t rows, C, ignore;
  float eps, z, cap, inv_cap, gamma, alpha_f;
  int64_t cache_packets;
  int64_t prefetch_bytes;
};

// Per-row gradient: g_j = (coef * exp(y_j - off) - w_j * (cq1 * q_j + cq0)) * dy_j/dx_j for j != t,
// and gt for the target class. off is lse (or lse + log(1 - p_t) for focal rows, where the exp then
// yields r_j = p_j / (1 - p_t), which cannot overflow).
struct RowGrad {
  float off, coef, cq0, cq1, gt;
};

// exp(y - m) as 2^((y - m) log2e): subtracting first keeps full precision when y and m are large
// and close (y*log2e - m*log2e in one fma would not: at |y| ~ 1000 that costs 4e-5 relative).
__device__ __forceinline__ float exp_diff(float y, float m) { return fast_exp2((y - m) * kLog2e); }

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
  // All -inf: nothing to add (and -inf - -inf would be NaN). NaN passes, so NaN logits poison s.
  if (vmax != -INFINITY) {
    float e[N];
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = exp_diff(y[i], a.m);
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

// log(1 + e^v), for any v (inf and NaN pass through).
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

template <typename T>
__device__ void fill_row(T* g, int64_t n, float v, int tid, int64_t nt) {
  constexpr int kN = Elem<T>::kPerPacket;
  const RowSplit<T> rs(g, n);
  if (tid < rs.head) store_elem(g + tid, v);
  if (rs.body_end + tid < n) store_elem(g + rs.body_end + tid, v);
  float vals[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) vals[i] = v;
  const uint4 p = pack<T>(vals);
  for (int64_t k = tid; k < rs.packets; k += nt) st_once(g + rs.first(k), p);
}

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
  extern __shared__ uint4 cache[];
  __shared__ ReduceSmem red;
  __shared__ RowGrad shared_rg;
  const int tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const float eps1 = 1.f - a.eps, epsC = a.eps / static_cast<float>(a.C);
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
        const float e_t = acc.m == -INFINITY ? 0.f : exp_diff(yt, acc.m);
        const float s_all = acc.s + e_t;
        const float lse = acc.m + logf(s_all);
        // From lr = log(s / e_t), the log-odds against the target: -log p_t = softplus(lr) and
        // log(1 - p_t) = -softplus(-lr), with no cancellation as p_t -> 1 (a confident row's tiny
        // CE keeps its relative precision). s = 0 (no other class has mass) gives log(1 - p_t) = -inf.
        const float lr = logf(acc.s) - (yt - acc.m);
        const float logp_t = -softplus(lr);
        const float log1mp = -softplus(-lr);
        float ce = eps1 * wt * -logp_t;
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
  const float eps1 = 1.f - a.eps, epsC = a.eps / static_cast<float>(a.C);
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

// ---- host side ----

constexpr const char* kFwd = "cross_entropy_fwd_cuda";
constexpr const char* kBwd = "cross_entropy_bwd_cuda";

struct Checked {
  bool soft;
  int64_t rows, C;
};

// The checks shared by the forward and the backward op.
Checked check_common(const char* op, const at::Tensor& logits, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha,
                     double label_smoothing, double z_loss, double softcap, double focal_gamma, double focal_alpha) {
  check_cuda(op, "logits", logits);
  check_kernel_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ", logits.sizes());
  check_unit_inner_stride(op, "logits", logits);
  const int64_t rows = logits.size(0), C = logits.size(1);
  TORCH_CHECK_VALUE(C > 0 || rows == 0, op, ": logits must have at least one class, got shape ", logits.sizes());
  check_on(op, "target", target, logits);
  const bool soft = target.is_floating_point();
  if (soft) {
    check_dtype(op, "target (class probabilities)", target, logits.scalar_type());
    check_shape(op, "target (class probabilities)", target, logits.sizes());
    check_unit_inner_stride(op, "target", target);
    TORCH_CHECK_VALUE(focal_gamma == 0.0 && focal_alpha == 1.0 && !alpha.has_value(), op,
                      ": focal_gamma/focal_alpha/alpha need class-index targets, got class probabilities "
                      "(focal_gamma=", focal_gamma, ", focal_alpha=", focal_alpha, ")");
  } else {
    check_dtype(op, "target (class indices)", target, at::kLong);
    check_shape(op, "target (class indices)", target, {rows});
    TORCH_CHECK_VALUE(rows <= 1 || target.stride(0) == 1, op, ": target must be contiguous, got stride ",
                      target.strides());
  }
  auto check_class_vector = [&](const char* name, const std::optional<at::Tensor>& vec) {
    if (!vec.has_value()) return;
    check_on(op, name, *vec, logits);
    check_dtype(op, name, *vec, at::kFloat);
    check_shape(op, name, *vec, {C});
    TORCH_CHECK_VALUE(vec->is_contiguous(), op, ": ", name, " must be contiguous, got stride ", vec->strides());
  };
  check_class_vector("weight", weight);
  check_class_vector("alpha", alpha);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0, op, ": softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK_VALUE(focal_gamma >= 0.0, op, ": focal_gamma must be >= 0, got ", focal_gamma);
  TORCH_CHECK_VALUE(std::isfinite(focal_alpha), op, ": focal_alpha must be finite, got ", focal_alpha);
  return {soft, rows, C};
}

void check_grad_buffer(const char* op, const at::Tensor& grad, const at::Tensor& logits) {
  check_on(op, "grad", grad, logits);
  check_dtype(op, "grad", grad, logits.scalar_type());
  check_shape(op, "grad", grad, logits.sizes());
  check_unit_inner_stride(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1), op,
                    ": grad rows must not overlap (stride(0) >= C), got strides ", grad.strides());
}

CeArgs make_args(const Checked& ck, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha, int64_t ignore_index,
                 double label_smoothing, double z_loss, double softcap, double focal_gamma, double focal_alpha) {
  CeArgs a{};
  a.x = logits.data_ptr();
  a.sx = logits.stride(0);
  if (ck.soft) {
    a.prob = target.data_ptr();
    a.sq = target.stride(0);
  } else {
    a.target = target.data_ptr<int64_t>();
  }
  a.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.alpha = alpha.has_value() ? alpha->data_ptr<float>() : nullptr;
  a.rows = ck.rows;
  a.C = ck.C;
  a.ignore = ignore_index;
  a.eps = static_cast<float>(label_smoothing);
  a.z = static_cast<float>(z_loss);
  a.cap = static_cast<float>(softcap);
  a.inv_cap = softcap > 0.0 ? static_cast<float>(1.0 / softcap) : 0.f;
  a.gamma = static_cast<float>(focal_gamma);
  a.alpha_f = static_cast<float>(focal_alpha);
  return a;
}

// Calls f(T, kSoft, kSmooth, kWElem, kCap) with the instantiation the options need. kSmooth only
// matters for class targets; probability targets always keep their sums.
template <typename F>
void dispatch_options(at::ScalarType st, const char* op, bool soft, bool has_weight, double eps, double softcap, F&& f) {
  dispatch_float(st, op, [&](auto tag) {
    with_flag(softcap > 0.0, [&](auto cap) {
      if (soft) {
        with_flag(has_weight, [&](auto welem) { f(tag, std::true_type{}, std::false_type{}, welem, cap); });
      } else if (eps == 0.0) {
        f(tag, std::false_type{}, std::false_type{}, std::false_type{}, cap);
      } else {
        with_flag(has_weight, [&](auto welem) { f(tag, std::false_type{}, std::true_type{}, welem, cap); });
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& alpha, const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double focal_gamma,
    double focal_alpha) {
  const Checked ck = check_common(kFwd, logits, target, weight, alpha, label_smoothing, z_loss, softcap,
                                  focal_gamma, focal_alpha);
  check_scalar_f32(kFwd, "grad_scale", grad_scale, logits);
  if (grad.has_value()) check_grad_buffer(kFwd, *grad, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({ck.rows}, f32);
  at::Tensor stats = at::empty({ck.rows, 4}, f32);
  if (ck.rows == 0) return {loss, stats};

  CeArgs a = make_args(ck, logits, target, weight, alpha, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                       focal_alpha);
  at::Tensor weight_sum;
  if (weight.has_value() && !ck.soft && label_smoothing > 0.0) {
    weight_sum = weight->sum();  // a device scalar: no host synchronisation
    a.weight_sum = weight_sum.data_ptr<float>();
  }
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.scale = grad_scale.data_ptr<float>();
  if (grad.has_value()) {
    a.grad = grad->data_ptr();
    a.sg = grad->stride(0);
  }
  const DeviceLimits limits = device_limits(logits.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_options(logits.scalar_type(), kFwd, ck.soft, weight.has_value(), label_smoothing, softcap,
                   [&](auto tag, auto soft, auto smooth, auto welem, auto cap) {
    using T = decltype(tag);
    constexpr int kU = unroll_for(decltype(soft)::value, decltype(welem)::value, decltype(cap)::value);
    with_flag(grad.has_value(), [&](auto want_grad) {
      auto kernel = ce_fwd_kernel<T, decltype(soft)::value, decltype(smooth)::value, decltype(welem)::value,
                                  decltype(cap)::value, decltype(want_grad)::value>;
      const RowPlan plan = plan_rows(ck.C / Elem<T>::kPerPacket, kU, decltype(want_grad)::value, limits);
      allow_smem(kernel, plan.smem);
      CeArgs b = a;
      b.cache_packets = plan.cache_packets;
      b.prefetch_bytes = plan.prefetch_bytes;
      kernel<<<grid_for_rows(plan, ck.rows, limits), plan.threads, plan.smem, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

void cross_entropy_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha, const at::Tensor& stats,
    const at::Tensor& grad, int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    double focal_gamma, double focal_alpha) {
  const Checked ck = check_common(kBwd, logits, target, weight, alpha, label_smoothing, z_loss, softcap,
                                  focal_gamma, focal_alpha);
  check_on(kBwd, "grad_rows", grad_rows, logits);
  check_dtype(kBwd, "grad_rows", grad_rows, at::kFloat);
  check_shape(kBwd, "grad_rows", grad_rows, {ck.rows});
  TORCH_CHECK_VALUE(grad_rows.is_contiguous(), kBwd, ": grad_rows must be contiguous, got stride ", grad_rows.strides());
  check_on(kBwd, "stats", stats, logits);
  check_dtype(kBwd, "stats", stats, at::kFloat);
  check_shape(kBwd, "stats", stats, {ck.rows, 4});
  TORCH_CHECK_VALUE(stats.is_contiguous(), kBwd, ": stats must be contiguous, got stride ", stats.strides());
  check_grad_buffer(kBwd, grad, logits);
  if (ck.rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());

  CeArgs a = make_args(ck, logits, target, weight, alpha, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                       focal_alpha);
  at::Tensor weight_sum;
  if (weight.has_value() && !ck.soft && label_smoothing > 0.0) {
    weight_sum = weight->sum();
    a.weight_sum = weight_sum.data_ptr<float>();
  }
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.scale = grad_rows.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.sg = grad.stride(0);
  const DeviceLimits limits = device_limits(logits.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_options(logits.scalar_type(), kBwd, ck.soft, weight.has_value(), label_smoothing, softcap,
                   [&](auto tag, auto soft, auto smooth, auto welem, auto cap) {
    using T = decltype(tag);
    constexpr int kU = unroll_for(decltype(soft)::value, decltype(welem)::value, decltype(cap)::value);
    auto kernel = ce_bwd_kernel<T, decltype(soft)::value, decltype(smooth)::value, decltype(welem)::value,
                                decltype(cap)::value>;
    const RowPlan plan = plan_rows(ck.C / Elem<T>::kPerPacket, kU, false, limits);
    kernel<<<grid_for(ck.rows), plan.threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lossforge

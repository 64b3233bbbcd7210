// Per-token log-probabilities and entropy of (M, V) logit rows at a temperature T, the RL heads (the
// contract is ops/log_probs.py's docstring; the maths reference/row_softmax.py's "Entropy rows").
//
// One thread block owns one row of z = logits / T at a time (grid-stride over rows).
//   Forward: one pass over the row in 16-byte packets with the online max m, s = sum e^(z - m) and
//   the first moment u = sum e^(z - m) (z - m) (row_softmax.cuh's MomentAcc), merged over the block;
//   thread 0 writes log p_t = (z_t - m) - log s, H = log s - u / s and [m, log s, H].
//   Backward: one pass that writes, for the grad_outputs g (of log p_t) and h (of H),
//       dL/dlogits_j = [g (1[j = t] - p_j) - h p_j (log p_j + H)] / T,
//   each packet loaded before it is stored (the gradient may be the logits themselves).
// Ignored rows are not read (outputs, stats and gradient 0); a target outside [0, V) gives NaN and
// nothing of the row is read. Designed traffic per logit: forward 1 read (2 B bf16), backward
// 1 read + 1 write (4 B bf16); 4 packets in flight per thread.
// Compile facts (nvcc 13.0, -O3, ptxas -v, sm_80 and sm_90): no spills, no stack frame; forward 46-56
// registers and 512 B of static shared memory, backward 56 (fp32) and 64 (fp16/bf16) registers.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "row_softmax.cuh"

namespace lossforge {
namespace log_probs {

constexpr int kUnroll = 4;  // 16-byte packets in flight per thread

struct Args {
  const void* x;
  int64_t sx;
  const int64_t* target;
  float* out;              // forward: (M, 2) [log p_t, H]
  float* stats;            // forward writes, backward reads: (M, 3) [m, log s, H]
  const float* grad_rows;  // backward: (M, 2) [g, h]
  void* grad;
  int64_t sg;
  int64_t rows, V, ignore;
  float inv_t;
};

// Whether the row is computed; otherwise `fill` is its outputs' value (0 ignored, NaN out of range).
__device__ __forceinline__ bool row_target(const Args& a, int64_t row, int64_t& t, float& fill) {
  t = a.target[row];
  fill = t == a.ignore ? 0.f : NAN;
  return t != a.ignore && t >= 0 && t < a.V;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) log_probs_fwd_kernel(const Args a) {
  __shared__ ReduceSmem red;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    float* out = a.out + 2 * row;
    float* stats = a.stats + 3 * row;
    int64_t t;
    float fill;
    if (!row_target(a, row, t, fill)) {
      if (threadIdx.x == 0) out[0] = out[1] = stats[0] = stats[1] = stats[2] = fill;
      continue;
    }
    const T* x = static_cast<const T*>(a.x) + row * a.sx;
    MomentAcc acc = moment_init();
    walk_row<T, kUnroll, false>(x, a.V, [&](int64_t, auto& z) {
      for (float& v : z) v *= a.inv_t;
      accumulate_moment(acc, z);
    });
    acc = block_merge_moment(acc, red);
    if (threadIdx.x == 0) {
      const float log_s = logf(acc.s), entropy = log_s - acc.u / acc.s;
      // an all -inf row: -inf - -inf = NaN, as torch gives
      out[0] = (load_elem(x + t) * a.inv_t - acc.m) - log_s;
      out[1] = stats[2] = entropy;
      stats[0] = acc.m;
      stats[1] = log_s;
    }
    __syncthreads();  // `red` is written again by the next row
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) log_probs_bwd_kernel(const Args a) {
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* g = static_cast<T*>(a.grad) + row * a.sg;
    int64_t t;
    float fill;
    if (!row_target(a, row, t, fill)) {
      fill_row(g, a.V, fill, threadIdx.x, blockDim.x);
      continue;
    }
    const T* x = static_cast<const T*>(a.x) + row * a.sx;
    const float* stats = a.stats + 3 * row;
    const float m = stats[0], log_s = stats[1], entropy = stats[2];
    const float go = a.grad_rows[2 * row] * a.inv_t, gh = a.grad_rows[2 * row + 1] * a.inv_t;
    const bool g_vec = same_phase(g, x);
    walk_row<T, kUnroll, false>(x, a.V, [&](int64_t j0, auto& z) {
      constexpr int n = sizeof(z) / sizeof(float);
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const float logp = (z[i] * a.inv_t - m) - log_s, p = exp_of(logp);
        // p (log p + H) is 0 where p is 0 (a -inf logit), not 0 * -inf
        z[i] = -go * p - (p == 0.f ? 0.f : gh * p * (logp + entropy));
        if (j0 + i == t) z[i] += go;
      }
      store_vals<T>(g + j0, g_vec, z);
    });
  }
}

}  // namespace log_probs
}  // namespace lossforge

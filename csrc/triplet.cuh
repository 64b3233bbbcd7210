// The triplet family's kernels: batch-hard mining, its pair gradient, and the semi_hard / batch_all
// row loss (contract: ops/triplet.py's docstring). The checks, the mining products and the launches
// are in triplet.cu.
//
// Mining: for each chunk of anchor rows, triplet.cu has cuBLAS make the C x B Gram block in fp32, and
// a reduction kernel turns each block of 8 rows into distances and keeps per anchor the farthest
// positive and nearest negative, ties to the smallest column. Each thread reads a column's label,
// norm and inverse norm once for the 8 rows. The full B x B matrix is never held.
// Designed traffic: the products' 2 B^2 D FLOPs plus 8 B^2 bytes of Gram blocks (written, read once).
// The pair gradient runs one block per row over its CSR entries in order (fp32, deterministic), one
// read of the other row per entry: ~(1 + entries) * D * elem_size bytes per row.
// The semi_hard / batch_all row kernel runs one block per anchor row of a C x B Gram block that
// ops/triplet.py makes with a matrix product: O(P_a B) work per row (P_a its positives, taken 4
// (semi_hard) or 8 (batch_all) at a time after an ordered compaction of each 256-column tile), every
// sum in a fixed order.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "enums.h"

namespace lossforge {
namespace triplet {

constexpr int kMineThreads = 256;
constexpr int kMineRows = 8;  // rows of the Gram block per reduction block
constexpr int kGradThreads = 128;
constexpr int kNormRowsPerBlock = 8;  // one warp per row
constexpr float kEuclideanEps = 1e-12f;

// ---- batch-hard mining and the pair gradient ----

template <typename T>
__global__ void __launch_bounds__(kNormRowsPerBlock * kWarpSize)
    row_sq_norm_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t n, int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n) return;
  const int lane = threadIdx.x % kWarpSize;
  float acc = 0.f;
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const float v = load_elem(x + row * d + k);
    acc = fmaf(v, v, acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) out[row] = acc;
}

// max(v, 0) that keeps a NaN (fmaxf returns the other operand for a NaN).
__device__ __forceinline__ float clamp_keep_nan(float v) { return isnan(v) ? v : fmaxf(v, 0.f); }

// A running best (value, index): `kMax` keeps the larger value, else the smaller; equal values
// keep the smaller index, so the result is that of a scan in index order (and exact in any order).
// A NaN wins over every number (the smallest NaN index), as torch's argmax/argmin choose (Triton's
// _fold_best): no comparison holds for a NaN, so it enters as the winning infinity with its index
// moved below every real one (index + INT_MIN); value() and index() read it back.
template <bool kMax>
struct Best {
  float v = kMax ? -INFINITY : INFINITY;
  int i = INT_MAX;
  __device__ __forceinline__ void take(float ov, int oi) {
    const bool nan = isnan(ov);
    ov = nan ? (kMax ? INFINITY : -INFINITY) : ov;
    oi = nan ? oi + INT_MIN : oi;
    const bool better = kMax ? ov > v : ov < v;
    if (better || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
  __device__ __forceinline__ bool found() const { return i != INT_MAX; }
  __device__ __forceinline__ float value() const { return i < 0 ? NAN : v; }
  __device__ __forceinline__ int index() const { return i < 0 ? i - INT_MIN : i; }
  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) {
      take(__shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, i, off));
    }
  }
};

struct MineArgs {
  const float* gram;   // rows x n block of the chunk
  const int64_t* labels;
  const float* sq;     // squared row norms
  const float* inv_norm;  // per row 1 / max(|x_i|, eps) (ops/triplet.py), or nullptr
  int64_t* pos_index;
  float* pos_dist;
  int64_t* neg_index;
  float* neg_dist;
  int64_t n, row0, rows;  // the chunk: rows row0 .. row0 + rows
};

template <int kKind, bool kInvNorm>
__device__ __forceinline__ float distance(float dot, float inv_r, float e_r, float inv_c, float e_c) {
  if constexpr (kInvNorm) dot *= inv_r * inv_c;
  if constexpr (kKind == kCosine) return 1.f - dot;
  const float sq = clamp_keep_nan(e_r + e_c - 2.f * dot);
  if constexpr (kKind == kSquaredEuclidean) return sq;
  return sqrtf(sq + kEuclideanEps);
}

template <int kKind, bool kInvNorm>
__global__ void __launch_bounds__(kMineThreads) triplet_mine_kernel(const MineArgs a) {
  constexpr int kWarps = kMineThreads / kWarpSize;
  __shared__ float sv[2][kWarps][kMineRows];
  __shared__ int si[2][kWarps][kMineRows];
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * kMineRows;
  const int rows = static_cast<int>(std::min<int64_t>(kMineRows, a.rows - local0));
  int64_t label[kMineRows];
  float inv_r[kMineRows], e_r[kMineRows];
#pragma unroll
  for (int r = 0; r < kMineRows; ++r) {
    const int64_t g = a.row0 + local0 + (r < rows ? r : rows - 1);
    label[r] = a.labels[g];
    inv_r[r] = kInvNorm ? a.inv_norm[g] : 1.f;
    e_r[r] = a.sq[g] * inv_r[r] * inv_r[r];
  }
  Best<true> pos[kMineRows];
  Best<false> neg[kMineRows];
  for (int64_t j = threadIdx.x; j < a.n; j += kMineThreads) {
    const int64_t label_c = a.labels[j];
    const float inv_c = kInvNorm ? a.inv_norm[j] : 1.f;
    const float e_c = a.sq[j] * inv_c * inv_c;
#pragma unroll
    for (int r = 0; r < kMineRows; ++r) {
      if (r >= rows) break;
      const float d = distance<kKind, kInvNorm>(a.gram[(local0 + r) * a.n + j], inv_r[r], e_r[r], inv_c, e_c);
      if (label_c == label[r]) {
        if (j != a.row0 + local0 + r) pos[r].take(d, static_cast<int>(j));
      } else {
        neg[r].take(d, static_cast<int>(j));
      }
    }
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < kMineRows; ++r) {
    pos[r].warp_reduce();
    neg[r].warp_reduce();
    if (lane == 0) {
      sv[0][warp][r] = pos[r].v;
      si[0][warp][r] = pos[r].i;
      sv[1][warp][r] = neg[r].v;
      si[1][warp][r] = neg[r].i;
    }
  }
  __syncthreads();
  if (threadIdx.x >= rows) return;
  const int r = threadIdx.x;
  Best<true> p;
  Best<false> q;
  for (int w = 0; w < kWarps; ++w) {  // a fixed order; the result does not depend on it anyway
    p.take(sv[0][w][r], si[0][w][r]);
    q.take(sv[1][w][r], si[1][w][r]);
  }
  const int64_t g = a.row0 + local0 + r;
  a.pos_index[g] = p.found() ? p.index() : -1;
  a.pos_dist[g] = p.found() ? p.value() : 0.f;
  a.neg_index[g] = q.found() ? q.index() : -1;
  a.neg_dist[g] = q.found() ? q.value() : 0.f;
}

struct PairGradArgs {
  const void* x;
  const float* inv_norm;  // or nullptr
  const int64_t* offsets;
  const int64_t* others;
  const float* coef;
  void* grad_x;           // or nullptr
  float* grad_inv_norm;   // or nullptr
  int64_t d;
};

template <typename T, bool kInvNorm, bool kCentered>
__global__ void __launch_bounds__(kGradThreads) triplet_pair_grad_kernel(const PairGradArgs a) {
  __shared__ float scratch[kGradThreads / kWarpSize];
  const T* x = static_cast<const T*>(a.x);
  T* grad_x = static_cast<T*>(a.grad_x);
  const int64_t r = blockIdx.x;
  const int64_t start = a.offsets[r], end = a.offsets[r + 1];
  const float inv_r = kInvNorm ? a.inv_norm[r] : 1.f;
  float dot = 0.f;
  for (int64_t k = threadIdx.x; k < a.d; k += kGradThreads) {
    const float x_r = load_elem(x + r * a.d + k);
    const float v_r = x_r * inv_r;
    float g = 0.f;
    for (int64_t e = start; e < end; ++e) {
      const int64_t o = a.others[e];
      const float v_o = load_elem(x + o * a.d + k) * (kInvNorm ? a.inv_norm[o] : 1.f);
      g = kCentered ? fmaf(a.coef[e], v_r - v_o, g) : fmaf(-a.coef[e], v_o, g);
    }
    if (grad_x != nullptr) store_elem(grad_x + r * a.d + k, g * inv_r);
    dot = fmaf(x_r, g, dot);
  }
  if (a.grad_inv_norm != nullptr) {
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) a.grad_inv_norm[r] = dot;
  }
}

// ---- semi_hard and batch_all: one block per anchor row of a C x B Gram block ----

constexpr int kRowThreads = 256;
constexpr int kRowGroup = 8;   // batch_all: positives taken together (one slope sum each per thread)
constexpr int kSemiGroup = 4;  // semi_hard: fewer, as each keeps a running best (value, index) per thread
constexpr float kClampedEuclidean = 1.000001e-6f;  // ops/triplet.py's CLAMPED_EUCLIDEAN

struct RowLossArgs {
  const float* gram;  // rows x n: gram[i][j] = x[row0 + i] . x[j]
  const float* sq;
  const float* inv_norm;  // or nullptr
  const int64_t* labels;
  const float* row_weight;  // with coef, or nullptr
  float* loss;
  int64_t* count;
  float* coef;
  int64_t n, row0;
  float margin;
};

template <int kKind>
__device__ __forceinline__ float grad_factor(float d) {
  if constexpr (kKind == kEuclidean) return d > kClampedEuclidean ? 1.f / d : 0.f;
  if constexpr (kKind == kSquaredEuclidean) return d > 0.f ? 2.f : 0.f;
  return 1.f;
}

// A triplet's loss for gap = d_ap - d_an and its derivative (relu's is 0 at 0, as autograd's); a NaN
// gap gives a NaN loss.
template <bool kSoft>
__device__ __forceinline__ void term_and_slope(float gap, float margin, float& term, float& slope) {
  if constexpr (kSoft) {
    term = clamp_keep_nan(gap) + log1pf(expf(-fabsf(gap)));
    slope = 1.f / (1.f + expf(-gap));
  } else {
    const float z = gap + margin;
    term = clamp_keep_nan(z);
    slope = z > 0.f ? 1.f : 0.f;
  }
}

// Sum over the block in a fixed order; valid in thread 0; the caller syncs before reusing scratch.
__device__ __forceinline__ int64_t block_sum_i64(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarpSize) ? scratch[lane] : 0;
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// Distances of one row from its Gram row (pointers copied: no address of the kernel's parameter).
template <int kKind, bool kInvNorm>
struct RowDistances {
  const float* gram;
  const float* sq;
  const float* inv_norm;
  float inv_r, e_r;
  __device__ __forceinline__ float operator()(int64_t j) const {
    const float inv_c = kInvNorm ? inv_norm[j] : 1.f;
    return distance<kKind, kInvNorm>(gram[j], inv_r, e_r, inv_c, sq[j] * inv_c * inv_c);
  }
};

struct RowShared {
  int list[kRowThreads];  // a tile's positives, in column order
  int warp_count[kRowThreads / kWarpSize];
  float fscratch[kRowThreads / kWarpSize];
  int64_t iscratch[kRowThreads / kWarpSize];
  float best_v[kRowThreads / kWarpSize][kRowGroup];
  int best_i[kRowThreads / kWarpSize][kRowGroup];
  int64_t n_neg;
  float far_v;
  int far_i;
};

// semi_hard: per positive the nearest negative beyond d_ap (else the farthest; a NaN negative, which
// no comparison finds beyond d_ap, is the farthest and then every pair's choice); thread 0 adds the
// terms and writes the coefficients in positive order, so shared negatives sum deterministically.
template <int kKind, bool kInvNorm, bool kSoft, bool kGrad>
__device__ __forceinline__ void semi_hard_group(const RowLossArgs& a, const RowDistances<kKind, kInvNorm>& dist,
                                                RowShared& sh, int64_t label, const int* group, int size,
                                                const float* d_ap, float rw, float* coef, float& my_loss) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  Best<false> near[kSemiGroup];
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < a.n; j += kRowThreads) {
    if (a.labels[j] == label) continue;
    const float d = dist(j);
#pragma unroll
    for (int k = 0; k < kSemiGroup; ++k) {
      if (k < size && d > d_ap[k]) near[k].take(d, static_cast<int>(j));
    }
  }
#pragma unroll
  for (int k = 0; k < kSemiGroup; ++k) {
    near[k].warp_reduce();
    if (lane == 0) {
      sh.best_v[warp][k] = near[k].v;
      sh.best_i[warp][k] = near[k].i;
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int k = 0; k < kSemiGroup; ++k) {  // unrolled: d_ap stays in registers
    if (k >= size) continue;
    Best<false> b;
    for (int w = 0; w < kRowThreads / kWarpSize; ++w) b.take(sh.best_v[w][k], sh.best_i[w][k]);
    const bool found = b.found() && sh.far_v == sh.far_v;  // a NaN negative (the farthest) is every choice
    const int chosen = found ? b.index() : sh.far_i;
    const float d_an = found ? b.value() : sh.far_v;
    float term, slope;
    term_and_slope<kSoft>(d_ap[k] - d_an, a.margin, term, slope);
    my_loss += term;
    if constexpr (kGrad) {
      const float w = slope * rw;
      coef[group[k]] = w * grad_factor<kKind>(d_ap[k]);
      coef[chosen] -= w * grad_factor<kKind>(d_an);
    }
  }
}

// batch_all: every (positive, negative); a negative's coefficient is updated only by the thread that
// owns its column (j = threadIdx.x mod kRowThreads), the positives' by thread 0 after a block sum.
template <int kKind, bool kInvNorm, bool kSoft, bool kGrad>
__device__ __forceinline__ void batch_all_group(const RowLossArgs& a, const RowDistances<kKind, kInvNorm>& dist,
                                                RowShared& sh, int64_t label, const int* group, int size,
                                                const float* d_ap, float rw, float* coef, float& my_loss,
                                                int64_t& my_count) {
  float w_pos[kRowGroup];
#pragma unroll
  for (int k = 0; k < kRowGroup; ++k) w_pos[k] = 0.f;
  int active = 0;  // this thread's hinge triplets with a loss > 0 in the group: at most 8 per column it owns
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < a.n; j += kRowThreads) {
    if (a.labels[j] == label) continue;
    const float d = dist(j);
    float w_neg = 0.f;
#pragma unroll
    for (int k = 0; k < kRowGroup; ++k) {  // no early exit: a fully unrolled loop keeps w_pos in registers
      float term, slope;
      term_and_slope<kSoft>(d_ap[k] - d, a.margin, term, slope);
      const bool live = k < size;
      my_loss += live ? term : 0.f;
      if constexpr (!kSoft) active += live && slope > 0.f ? 1 : 0;
      slope = live ? slope : 0.f;
      w_pos[k] += slope;
      w_neg += slope;
    }
    if constexpr (kGrad) coef[j] -= w_neg * rw * grad_factor<kKind>(d);
  }
  my_count += active;
  if constexpr (kGrad) {
#pragma unroll
    for (int k = 0; k < kRowGroup; ++k) {
      const float total = block_sum(w_pos[k], sh.fscratch);
      if (threadIdx.x == 0 && k < size) coef[group[k]] = total * rw * grad_factor<kKind>(d_ap[k]);
      __syncthreads();
    }
  }
}

// min 1 block per SM: without it ptxas held this kernel at 64 registers and spilled 4-12 bytes in 7 variants
template <int kKind, bool kInvNorm, bool kSemi, bool kSoft, bool kGrad>
__global__ void __launch_bounds__(kRowThreads, 1) triplet_row_loss_kernel(const RowLossArgs a) {
  constexpr int kWarps = kRowThreads / kWarpSize;
  __shared__ RowShared sh;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t i = blockIdx.x, anchor = a.row0 + i;
  const int64_t label = a.labels[anchor];
  const float inv_r = kInvNorm ? a.inv_norm[anchor] : 1.f;
  const RowDistances<kKind, kInvNorm> dist{a.gram + i * a.n, a.sq, a.inv_norm, inv_r, a.sq[anchor] * inv_r * inv_r};
  float* coef = kGrad ? a.coef + i * a.n : nullptr;
  const float rw = kGrad ? a.row_weight[i] : 0.f;

  // pass 1: the negatives' count and the farthest one (smallest column on ties); a zeroed coef row
  int64_t my_neg = 0;
  Best<true> far;
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < a.n; j += kRowThreads) {
    if (a.labels[j] != label) {
      ++my_neg;
      if constexpr (kSemi) far.take(dist(j), static_cast<int>(j));
    }
    if constexpr (kGrad) coef[j] = 0.f;
  }
  my_neg = block_sum_i64(my_neg, sh.iscratch);
  if (threadIdx.x == 0) sh.n_neg = my_neg;
  far.warp_reduce();
  if (lane == 0) {
    sh.best_v[warp][0] = far.v;
    sh.best_i[warp][0] = far.i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Best<true> f;
    for (int w = 0; w < kWarps; ++w) f.take(sh.best_v[w][0], sh.best_i[w][0]);
    sh.far_v = f.value();
    sh.far_i = f.index();
  }
  __syncthreads();
  const int64_t n_neg = sh.n_neg;

  // pass 2: each tile's positives, compacted in column order, in groups of kGroup
  float my_loss = 0.f;
  int64_t my_count = 0;
  for (int64_t tile = 0; n_neg > 0 && tile < a.n; tile += kRowThreads) {
    const int64_t j = tile + threadIdx.x;
    const bool is_pos = j < a.n && j != anchor && a.labels[j] == label;
    const unsigned ballot = __ballot_sync(0xffffffffu, is_pos);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, in_tile = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? sh.warp_count[w] : 0;
      in_tile += sh.warp_count[w];
    }
    if (is_pos) sh.list[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(j);
    __syncthreads();
    if (threadIdx.x == 0 && (kSemi || kSoft)) my_count += kSemi ? in_tile : in_tile * n_neg;
    constexpr int kGroup = kSemi ? kSemiGroup : kRowGroup;
    for (int g0 = 0; g0 < in_tile; g0 += kGroup) {
      const int size = min(kGroup, in_tile - g0);
      float d_ap[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) d_ap[k] = k < size ? dist(sh.list[g0 + k]) : 0.f;
      if constexpr (kSemi) {
        semi_hard_group<kKind, kInvNorm, kSoft, kGrad>(a, dist, sh, label, sh.list + g0, size, d_ap, rw, coef,
                                                     my_loss);
      } else {
        batch_all_group<kKind, kInvNorm, kSoft, kGrad>(a, dist, sh, label, sh.list + g0, size, d_ap, rw, coef,
                                                     my_loss, my_count);
      }
      __syncthreads();
    }
  }
  const float total = block_sum(my_loss, sh.fscratch);
  const int64_t count = block_sum_i64(my_count, sh.iscratch);
  if (threadIdx.x == 0) {
    a.loss[i] = total;
    a.count[i] = count;
  }
}

}  // namespace triplet
}  // namespace lossforge

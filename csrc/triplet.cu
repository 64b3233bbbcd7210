// Batch-hard triplet mining and its pair gradient (contract: ops/triplet.py's docstring, checked in
// Python before every call).
//
// Mining walks the anchors in chunks of C rows: cuBLAS makes the chunk's C x B Gram block in fp32
// (at::mm with an fp32 output, so half-precision products are accumulated and kept in fp32) into one
// buffer reused by every chunk (C * B * 4 bytes, about 32 MiB, so it mostly stays in L2), and a
// reduction kernel turns each block of 8 rows into distances and keeps per anchor the farthest
// positive and nearest negative, ties to the smallest column. Each thread reads a column's label,
// norm and scale once for the 8 rows. The full B x B matrix is never held.
// Designed traffic: the products' 2 B^2 D FLOPs plus 8 B^2 bytes of Gram blocks (written, read once).
// The pair gradient runs one block per row over its CSR entries in order (fp32, deterministic), one
// read of the other row per entry: ~(1 + entries) * D * elem_size bytes per row.
// The semi_hard / batch_all row kernel runs one block per anchor row of a C x B Gram block that
// ops/triplet.py makes with a matrix product: O(P_a B) work per row (P_a its positives, taken 4
// (semi_hard) or 8 (batch_all) at a time after an ordered compaction of each 256-column tile), every
// sum in a fixed order.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "common.cuh"
#include "host_utils.h"

namespace lossforge {
namespace {

constexpr int kMineThreads = 256;
constexpr int kMineRows = 8;  // rows of the Gram block per reduction block
constexpr int kGradThreads = 128;
constexpr int kNormRowsPerBlock = 8;  // one warp per row
constexpr int64_t kChunkBytes = 32ll << 20;
constexpr int64_t kMinChunkRows = 256;  // below this the products are bound by re-reading x
constexpr float kEuclideanEps = 1e-12f;

enum Kind : int { kEuclidean = 0, kSquared = 1, kCosine = 2 };

// ---- device side ----

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
  const float* scale;  // or nullptr
  int64_t* pos_index;
  float* pos_dist;
  int64_t* neg_index;
  float* neg_dist;
  int64_t n, row0, rows;  // the chunk: rows row0 .. row0 + rows
};

template <int kKind, bool kScale>
__device__ __forceinline__ float distance(float dot, float s_r, float e_r, float s_c, float e_c) {
  if constexpr (kScale) dot *= s_r * s_c;
  if constexpr (kKind == kCosine) return 1.f - dot;
  const float sq = clamp_keep_nan(e_r + e_c - 2.f * dot);
  if constexpr (kKind == kSquared) return sq;
  return sqrtf(sq + kEuclideanEps);
}

template <int kKind, bool kScale>
__global__ void __launch_bounds__(kMineThreads) triplet_mine_kernel(const MineArgs a) {
  constexpr int kWarps = kMineThreads / kWarpSize;
  __shared__ float sv[2][kWarps][kMineRows];
  __shared__ int si[2][kWarps][kMineRows];
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * kMineRows;
  const int rows = static_cast<int>(std::min<int64_t>(kMineRows, a.rows - local0));
  int64_t label[kMineRows];
  float s_r[kMineRows], e_r[kMineRows];
#pragma unroll
  for (int r = 0; r < kMineRows; ++r) {
    const int64_t g = a.row0 + local0 + (r < rows ? r : rows - 1);
    label[r] = a.labels[g];
    s_r[r] = kScale ? a.scale[g] : 1.f;
    e_r[r] = a.sq[g] * s_r[r] * s_r[r];
  }
  Best<true> pos[kMineRows];
  Best<false> neg[kMineRows];
  for (int64_t j = threadIdx.x; j < a.n; j += kMineThreads) {
    const int64_t label_c = a.labels[j];
    const float s_c = kScale ? a.scale[j] : 1.f;
    const float e_c = a.sq[j] * s_c * s_c;
#pragma unroll
    for (int r = 0; r < kMineRows; ++r) {
      if (r >= rows) break;
      const float d = distance<kKind, kScale>(a.gram[(local0 + r) * a.n + j], s_r[r], e_r[r], s_c, e_c);
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
  const float* scale;  // or nullptr
  const int64_t* offsets;
  const int64_t* others;
  const float* coef;
  void* grad_x;        // or nullptr
  float* grad_scale;   // or nullptr
  int64_t d;
};

template <typename T, bool kScale, bool kCentered>
__global__ void __launch_bounds__(kGradThreads) triplet_pair_grad_kernel(const PairGradArgs a) {
  __shared__ float scratch[kGradThreads / kWarpSize];
  const T* x = static_cast<const T*>(a.x);
  T* grad_x = static_cast<T*>(a.grad_x);
  const int64_t r = blockIdx.x;
  const int64_t start = a.offsets[r], end = a.offsets[r + 1];
  const float s_r = kScale ? a.scale[r] : 1.f;
  float dot = 0.f;
  for (int64_t k = threadIdx.x; k < a.d; k += kGradThreads) {
    const float x_r = load_elem(x + r * a.d + k);
    const float v_r = x_r * s_r;
    float g = 0.f;
    for (int64_t e = start; e < end; ++e) {
      const int64_t o = a.others[e];
      const float v_o = load_elem(x + o * a.d + k) * (kScale ? a.scale[o] : 1.f);
      g = kCentered ? fmaf(a.coef[e], v_r - v_o, g) : fmaf(-a.coef[e], v_o, g);
    }
    if (grad_x != nullptr) store_elem(grad_x + r * a.d + k, g * s_r);
    dot = fmaf(x_r, g, dot);
  }
  if (a.grad_scale != nullptr) {
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) a.grad_scale[r] = dot;
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
  const float* scale;  // or nullptr
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
  if constexpr (kKind == kSquared) return d > 0.f ? 2.f : 0.f;
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
template <int kKind, bool kScale>
struct RowDistances {
  const float* gram;
  const float* sq;
  const float* scale;
  float s_r, e_r;
  __device__ __forceinline__ float operator()(int64_t j) const {
    const float s_c = kScale ? scale[j] : 1.f;
    return distance<kKind, kScale>(gram[j], s_r, e_r, s_c, sq[j] * s_c * s_c);
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
template <int kKind, bool kScale, bool kSoft, bool kGrad>
__device__ __forceinline__ void semi_hard_group(const RowLossArgs& a, const RowDistances<kKind, kScale>& dist,
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
template <int kKind, bool kScale, bool kSoft, bool kGrad>
__device__ __forceinline__ void batch_all_group(const RowLossArgs& a, const RowDistances<kKind, kScale>& dist,
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
template <int kKind, bool kScale, bool kSemi, bool kSoft, bool kGrad>
__global__ void __launch_bounds__(kRowThreads, 1) triplet_row_loss_kernel(const RowLossArgs a) {
  constexpr int kWarps = kRowThreads / kWarpSize;
  __shared__ RowShared sh;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t i = blockIdx.x, anchor = a.row0 + i;
  const int64_t label = a.labels[anchor];
  const float s_r = kScale ? a.scale[anchor] : 1.f;
  const RowDistances<kKind, kScale> dist{a.gram + i * a.n, a.sq, a.scale, s_r, a.sq[anchor] * s_r * s_r};
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
        semi_hard_group<kKind, kScale, kSoft, kGrad>(a, dist, sh, label, sh.list + g0, size, d_ap, rw, coef,
                                                     my_loss);
      } else {
        batch_all_group<kKind, kScale, kSoft, kGrad>(a, dist, sh, label, sh.list + g0, size, d_ap, rw, coef,
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

// ---- host side ----

constexpr const char* kMine = "triplet_mine_cuda";
constexpr const char* kPairGrad = "triplet_pair_grad_cuda";

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t n,
                  at::ScalarType dtype) {
  check_on(op, name, t, x);
  check_dtype(op, name, t, dtype);
  check_shape(op, name, t, {n});
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_rows(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  check_cuda(op, "x", x);
  check_kernel_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ",
                    x.sizes(), " and strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(0) < INT_MAX, op, ": at most ", INT_MAX - 1, " rows, got ", x.size(0));
  if (scale.has_value()) check_vector(op, "scale", *scale, x, x.size(0), at::kFloat);
}

int kind_of(const std::string& distance) {
  if (distance == "euclidean") return kEuclidean;
  if (distance == "squared_euclidean") return kSquared;
  TORCH_CHECK_VALUE(distance == "cosine", kMine, ": unknown distance '", distance, "'");
  return kCosine;
}

template <typename F>
void with_kind(int kind, F&& f) {
  switch (kind) {
    case kEuclidean: f(std::integral_constant<int, kEuclidean>{}); break;
    case kSquared: f(std::integral_constant<int, kSquared>{}); break;
    default: f(std::integral_constant<int, kCosine>{}); break;
  }
}

at::Tensor row_sq_norms(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor sq = at::empty({n}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), kMine, [&](auto tag) {
    using T = decltype(tag);
    launch(x.device(), &row_sq_norm_kernel<T>, grid_for((n + kNormRowsPerBlock - 1) / kNormRowsPerBlock),
           kNormRowsPerBlock * kWarpSize, 0, static_cast<const T*>(x.const_data_ptr()), sq.data_ptr<float>(), n, d);
  });
  return sq;
}

void triplet_mine_cuda(const at::Tensor& x, const at::Tensor& labels, const std::optional<at::Tensor>& scale,
                       c10::string_view distance, const at::Tensor& pos_index, const at::Tensor& pos_dist,
                       const at::Tensor& neg_index, const at::Tensor& neg_dist) {
  check_rows(kMine, x, scale);
  const int64_t n = x.size(0);
  check_vector(kMine, "labels", labels, x, n, at::kLong);
  check_vector(kMine, "pos_index", pos_index, x, n, at::kLong);
  check_vector(kMine, "pos_dist", pos_dist, x, n, at::kFloat);
  check_vector(kMine, "neg_index", neg_index, x, n, at::kLong);
  check_vector(kMine, "neg_dist", neg_dist, x, n, at::kFloat);
  const int kind = kind_of(std::string(distance));
  TORCH_CHECK_VALUE(kind != kCosine || scale.has_value(), kMine, ": cosine distances need the rows' scale");
  if (n == 0) return;

  const at::Tensor sq = row_sq_norms(x);
  const int64_t chunk = std::min(n, std::max(kMinChunkRows, kChunkBytes / (4 * n)));
  at::Tensor gram = at::empty({chunk, n}, x.options().dtype(at::kFloat));
  const at::Tensor xt = x.t();
  MineArgs a{};
  a.labels = labels.const_data_ptr<int64_t>();
  a.sq = sq.const_data_ptr<float>();
  a.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  a.pos_index = pos_index.data_ptr<int64_t>();
  a.pos_dist = pos_dist.data_ptr<float>();
  a.neg_index = neg_index.data_ptr<int64_t>();
  a.neg_dist = neg_dist.data_ptr<float>();
  a.n = n;
  for (int64_t row0 = 0; row0 < n; row0 += chunk) {
    const int64_t rows = std::min(chunk, n - row0);
    at::Tensor block = gram.narrow(0, 0, rows);
    const at::Tensor part = x.narrow(0, row0, rows);
    if (x.scalar_type() == at::kFloat) {
      at::mm_out(block, part, xt);
    } else {
      at::mm_out(block, part, xt, at::kFloat);  // fp32 output: no rounding of the dot products
    }
    a.gram = block.const_data_ptr<float>();
    a.row0 = row0;
    a.rows = rows;
    with_kind(kind, [&](auto k) {
      with_flag(scale.has_value(), [&](auto s) {
        launch(x.device(), &triplet_mine_kernel<decltype(k)::value, decltype(s)::value>,
               grid_for((rows + kMineRows - 1) / kMineRows), kMineThreads, 0, a);
      });
    });
  }
}

void triplet_pair_grad_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale, const at::Tensor& offsets,
                            const at::Tensor& others, const at::Tensor& coef, bool centered,
                            const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_scale) {
  check_rows(kPairGrad, x, scale);
  const int64_t n = x.size(0);
  check_vector(kPairGrad, "offsets", offsets, x, n + 1, at::kLong);
  TORCH_CHECK_VALUE(others.dim() == 1, kPairGrad, ": others must be 1-D, got shape ", others.sizes());
  check_vector(kPairGrad, "others", others, x, others.size(0), at::kLong);
  check_vector(kPairGrad, "coef", coef, x, others.size(0), at::kFloat);
  if (grad_x.has_value()) {
    check_on(kPairGrad, "grad_x", *grad_x, x);
    check_dtype(kPairGrad, "grad_x", *grad_x, x.scalar_type());
    check_shape(kPairGrad, "grad_x", *grad_x, x.sizes());
    TORCH_CHECK_VALUE(grad_x->is_contiguous(), kPairGrad, ": grad_x must be contiguous");
  }
  if (grad_scale.has_value()) {
    TORCH_CHECK_VALUE(scale.has_value(), kPairGrad, ": grad_scale needs a scale");
    check_vector(kPairGrad, "grad_scale", *grad_scale, x, n, at::kFloat);
  }
  if (n == 0 || (!grad_x.has_value() && !grad_scale.has_value())) return;

  PairGradArgs a{};
  a.x = x.const_data_ptr();
  a.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.others = others.const_data_ptr<int64_t>();
  a.coef = coef.const_data_ptr<float>();
  a.grad_x = grad_x.has_value() ? grad_x->data_ptr() : nullptr;
  a.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  a.d = x.size(1);
  dispatch_float(x.scalar_type(), kPairGrad, [&](auto tag) {
    using T = decltype(tag);
    with_flag(scale.has_value(), [&](auto s) {
      with_flag(centered, [&](auto c) {
        launch(x.device(), &triplet_pair_grad_kernel<T, decltype(s)::value, decltype(c)::value>, grid_for(n),
               kGradThreads, 0, a);
      });
    });
  });
}

constexpr const char* kRowLoss = "triplet_row_loss_cuda";

void triplet_row_loss_cuda(const at::Tensor& gram, const at::Tensor& sq, const std::optional<at::Tensor>& scale,
                           const at::Tensor& labels, int64_t row0, c10::string_view mining, c10::string_view distance,
                           double margin, bool soft_margin, const std::optional<at::Tensor>& row_weight,
                           const at::Tensor& loss, const at::Tensor& count, const std::optional<at::Tensor>& coef) {
  check_cuda(kRowLoss, "gram", gram);
  check_dtype(kRowLoss, "gram", gram, at::kFloat);
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.is_contiguous(), kRowLoss, ": gram must be a contiguous 2-D tensor, got "
                    "shape ", gram.sizes(), " and strides ", gram.strides());
  const int64_t rows = gram.size(0), n = gram.size(1);
  TORCH_CHECK_VALUE(n < INT_MAX, kRowLoss, ": at most ", INT_MAX - 1, " columns, got ", n);
  TORCH_CHECK_VALUE(row0 >= 0 && row0 + rows <= n, kRowLoss, ": row0 must be in [0, ", n - rows, "], got ", row0);
  check_vector(kRowLoss, "sq", sq, gram, n, at::kFloat);
  if (scale.has_value()) check_vector(kRowLoss, "scale", *scale, gram, n, at::kFloat);
  check_vector(kRowLoss, "labels", labels, gram, n, at::kLong);
  check_vector(kRowLoss, "loss", loss, gram, rows, at::kFloat);
  check_vector(kRowLoss, "count", count, gram, rows, at::kLong);
  TORCH_CHECK_VALUE(row_weight.has_value() == coef.has_value(), kRowLoss, ": row_weight and coef come together");
  if (coef.has_value()) {
    check_vector(kRowLoss, "row_weight", *row_weight, gram, rows, at::kFloat);
    check_on(kRowLoss, "coef", *coef, gram);
    check_dtype(kRowLoss, "coef", *coef, at::kFloat);
    check_shape(kRowLoss, "coef", *coef, gram.sizes());
    TORCH_CHECK_VALUE(coef->is_contiguous(), kRowLoss, ": coef must be contiguous");
  }
  const std::string how(mining);
  TORCH_CHECK_VALUE(how == "semi_hard" || how == "batch_all", kRowLoss, ": unknown mining '", how, "'");
  const int kind = kind_of(std::string(distance));
  TORCH_CHECK_VALUE(kind != kCosine || scale.has_value(), kRowLoss, ": cosine distances need the rows' scale");
  if (rows == 0) return;

  RowLossArgs a{};
  a.gram = gram.const_data_ptr<float>();
  a.sq = sq.const_data_ptr<float>();
  a.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  a.labels = labels.const_data_ptr<int64_t>();
  a.row_weight = row_weight.has_value() ? row_weight->const_data_ptr<float>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.count = count.data_ptr<int64_t>();
  a.coef = coef.has_value() ? coef->data_ptr<float>() : nullptr;
  a.n = n;
  a.row0 = row0;
  a.margin = static_cast<float>(margin);
  with_kind(kind, [&](auto k) {
    with_flag(scale.has_value(), [&](auto s) {
      with_flag(how == "semi_hard", [&](auto semi) {
        with_flag(soft_margin, [&](auto soft) {
          with_flag(coef.has_value(), [&](auto grad) {
            launch(gram.device(),
                   &triplet_row_loss_kernel<decltype(k)::value, decltype(s)::value, decltype(semi)::value,
                                            decltype(soft)::value, decltype(grad)::value>,
                   grid_for(rows), kRowThreads, 0, a);
          });
        });
      });
    });
  });
}

}  // namespace
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  m.impl("triplet_mine_cuda", TORCH_FN(lossforge::triplet_mine_cuda));
  m.impl("triplet_pair_grad_cuda", TORCH_FN(lossforge::triplet_pair_grad_cuda));
  m.impl("triplet_row_loss_cuda", TORCH_FN(lossforge::triplet_row_loss_cuda));
}

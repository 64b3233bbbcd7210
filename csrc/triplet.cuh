// The triplet family's kernels: batch-hard mining, its kept-anchor count and pair gradient, and the
// semi_hard / batch_all row loss (contract: ops/triplet.py's docstring). The checks, the mining
// products and the launches are in triplet.cu.
//
// Mining keeps per anchor the farthest positive and nearest negative, ties to the smallest column, and
// never holds the B x B matrix. triplet_mine_tiles_kernel: one launch whose blocks form the Gram
// tiles on the tensor cores (csrc/tiles.cuh; fp32 rows as three tf32 products, to about fp32's
// precision) and fold them into distances in registers. Rows too wide for the tiles' shared memory:
// for each chunk of anchor rows, triplet.cu has cuBLAS make the C x B
// Gram block in fp32, and a reduction kernel turns each block of 8 rows into distances; each thread
// reads a column's label, norm, inverse norm and non-finite flag once for the 8 rows. Both end in
// write_mined (one warp per anchor), which takes the two mined distances again from the rows'
// differences and writes the anchor's loss and slope.
// Designed traffic: the products' 2 B^2 D FLOPs, 3 D elements per anchor in the epilogue, and
//   tiles   (B / 64) B D e bytes of column tiles staged from L2 (the anchors once per block), no Gram
//           bytes in device memory; 17 GB at B = 32768, D = 512, bf16;
//   chunks  8 B^2 bytes of Gram blocks (written, read once), 20 B^2 / 8 bytes of per-column values.
// Kept count: one thread per anchor against tiles of labels, until each anchor of the block has a
// positive and a negative (B^2 integer compares at worst); a fused 'mean' takes the mining's kept flags
// instead. The normalisation around every mining: row_norms_kernel (inv_norm and radial, one warp per
// row) and finish_normalised_kernel (the gradient's radial part off, rounded once; a block per row).
// The pair gradient: a block owns 32 rows x 256 features; after the rows' own pairs it scans every
// anchor's partner indices (16 B bytes per block, from L2) and adds the anchors that chose one of its
// rows in anchor order (fp32 in shared memory, deterministic, no atomics).
// The semi_hard / batch_all row kernel runs one block per anchor row of a C x B Gram block that
// ops/triplet.py makes with a matrix product: O(P_a B) work per row (P_a its positives, taken 4
// (semi_hard) or 8 (batch_all) at a time after an ordered compaction of each 256-column tile), every
// sum in a fixed order.
// semi_hard's register path (bf16/fp16): triplet_semi_hard_tiles_kernel mines each anchor's 16
// positive slots on the batch-hard tiles' sweep; then the pair distances (one warp per pair: Gram form
// and exact from one pass over both rows) and the list gradient (one warp per row, lanes over the
// features, its list in order). batch_all's register path (fp32 too): triplet_batch_all_tiles_kernel, last
// in this file, takes the losses, counts, slot slopes and the negative pairs' gradient from tiles on chip.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "enums.h"
#include "tiles.cuh"

namespace lossforge {
namespace triplet {

constexpr int kMineThreads = 256;
constexpr int kMineRows = 8;  // rows of the Gram block per reduction block
constexpr int kNormRowsPerBlock = 8;  // one warp per row
constexpr float kEuclideanEps = 1e-12f;
constexpr float kClampedEuclidean = 1.000001e-6f;  // ops/triplet.py's CLAMPED_EUCLIDEAN

// ---- batch-hard mining, its kept-anchor count and its pair gradient ----

// out[row] = |x_row|^2 and out[n + row] = 1 if x_row holds a NaN or inf, else 0.
template <typename T>
__global__ void __launch_bounds__(kNormRowsPerBlock * kWarpSize)
    row_sq_norm_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t n, int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n) return;
  const int lane = threadIdx.x % kWarpSize;
  float acc = 0.f, bad = 0.f;
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const float v = load_elem(x + row * d + k);
    acc = fmaf(v, v, acc);
    bad = fabsf(v) < INFINITY ? bad : 1.f;
  }
  acc = warp_sum(acc);
  bad = warp_sum(bad);
  if (lane == 0) {
    out[row] = acc;
    out[n + row] = bad > 0.f ? 1.f : 0.f;
  }
}

// ---- the normalisation around every mining (ops/triplet.py's row-norm and finishing ops) ----

constexpr int kFinishThreads = 256;

// inv_norm and radial per row (common.cuh's norm_factors), one warp per row.
template <typename T, bool kTwice>
__global__ void __launch_bounds__(kNormRowsPerBlock * kWarpSize)
    row_norms_kernel(const T* __restrict__ x, float* __restrict__ inv_norm, float* __restrict__ radial, int64_t n,
                     int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n) return;
  float acc = 0.f;
  for (int64_t k = threadIdx.x % kWarpSize; k < d; k += kWarpSize) {
    const float v = load_elem(x + row * d + k);
    acc = fmaf(v, v, acc);
  }
  acc = warp_sum(acc);
  if (threadIdx.x % kWarpSize != 0) return;
  float inv, rad;
  norm_factors<kTwice>(sqrtf(acc), inv, rad);
  inv_norm[row] = inv;
  radial[row] = rad;
}

// grad_x = partial - (u . partial) u, u = radial x, in fp32 and rounded once; a block per row at a time:
// the dot product first (per-thread sums in feature order, then the warps' in order), then the row.
// grad_x may be partial itself (fp32): a row's reads all precede its writes.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads)
    finish_normalised_kernel(const float* partial, const T* __restrict__ x, const float* __restrict__ radial,
                             T* grad_x, int64_t n, int64_t d) {
  constexpr int kWarps = kFinishThreads / kWarpSize;
  __shared__ float sums[kWarps];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float r = radial[row];
    const float* p = partial + row * d;
    const T* xr = x + row * d;
    float dot = 0.f;
    for (int64_t k = threadIdx.x; k < d; k += kFinishThreads) dot = fmaf(load_elem(xr + k) * r, p[k], dot);
    dot = warp_sum(dot);
    if (threadIdx.x % kWarpSize == 0) sums[threadIdx.x / kWarpSize] = dot;
    __syncthreads();
    float along = 0.f;
    for (int w = 0; w < kWarps; ++w) along += sums[w];
    __syncthreads();  // read by every thread before the next row's sums
    for (int64_t k = threadIdx.x; k < d; k += kFinishThreads) {
      store_elem(grad_x + row * d + k, p[k] - along * (load_elem(xr + k) * r));
    }
  }
}

// max(v, 0) that keeps a NaN (fmaxf returns the other operand for a NaN).
__device__ __forceinline__ float clamp_keep_nan(float v) { return isnan(v) ? v : fmaxf(v, 0.f); }

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

__device__ __forceinline__ void term_and_slope(bool soft, float gap, float margin, float& term, float& slope) {
  if (soft) {
    term_and_slope<true>(gap, margin, term, slope);
  } else {
    term_and_slope<false>(gap, margin, term, slope);
  }
}

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
  // Merges the best of each group of kLanes adjacent lanes (every lane of the warp calls it).
  template <int kLanes = kWarpSize>
  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) {
      take(__shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, i, off));
    }
  }
};

struct MineArgs {
  const void* x;       // (n, d) rows, for the mined pairs' differences
  const float* gram;   // rows x n block of the chunk
  const int64_t* labels;
  const float* sq;     // squared row norms, then per row 1 if it holds a NaN or inf (2n values)
  const float* inv_norm;  // per row 1 / max(|x_i|, eps) (ops/triplet.py), or nullptr
  int64_t* pos_index;
  float* pos_dist;
  int64_t* neg_index;
  float* neg_dist;
  float* loss;
  float* slope;
  float* kept;  // 1 for an anchor with both partners, else 0; or nullptr
  int64_t n, d, row0, rows;  // the chunk: rows row0 .. row0 + rows
  float margin;
  bool vec;  // the tiled kernel: 16-byte loads (d % 8 == 0, x 16-byte aligned)
};

template <int kKind, bool kInvNorm>
__device__ __forceinline__ float distance(float dot, float inv_r, float e_r, float inv_c, float e_c) {
  // one factor at a time: inv_r inv_c overflows for two zero rows (cosine of normalised rows: 1e24 each)
  if constexpr (kInvNorm) dot = dot * inv_r * inv_c;
  if constexpr (kKind == kCosine) return 1.f - dot;
  const float sq = clamp_keep_nan(e_r + e_c - 2.f * dot);
  if constexpr (kKind == kSquaredEuclidean) return sq;
  return sqrtf(sq + kEuclideanEps);
}

// sum over d of (v_a - v_o)^2 in fp32 by one warp (v = inv_norm * x), valid in every lane.
template <typename T, bool kInvNorm>
__device__ __forceinline__ float difference_sq(const MineArgs& a, int64_t row, int64_t other) {
  const T* x = static_cast<const T*>(a.x);
  const float inv_a = kInvNorm ? a.inv_norm[row] : 1.f, inv_o = kInvNorm ? a.inv_norm[other] : 1.f;
  float acc = 0.f;
  for (int64_t k = threadIdx.x % kWarpSize; k < a.d; k += kWarpSize) {
    const float diff = load_elem(x + row * a.d + k) * inv_a - load_elem(x + other * a.d + k) * inv_o;
    acc = fmaf(diff, diff, acc);
  }
  return warp_sum(acc);
}

// A mined Gram-form distance taken again from the rows' difference when it is finite (cosine: as is).
template <typename T, int kKind, bool kInvNorm>
__device__ __forceinline__ float exact_distance(const MineArgs& a, int64_t row, int other, float gram_form) {
  if constexpr (kKind == kCosine) return gram_form;
  const float sq = difference_sq<T, kInvNorm>(a, row, other);  // (every lane: the warp's sum)
  if (!(fabsf(gram_form) < INFINITY)) return gram_form;
  return kKind == kSquaredEuclidean ? sq : sqrtf(sq + kEuclideanEps);
}

// Anchor g's outputs from its mined pair: the two distances again from the rows' differences, the
// loss and the slope (every lane of the warp calls it; lane 0 writes).
template <typename T, int kKind, bool kInvNorm, bool kSoft>
__device__ __forceinline__ void write_mined(const MineArgs& a, int64_t g, const Best<true>& p, const Best<false>& q,
                                            bool poisoned) {
  const float d_p = p.found() ? exact_distance<T, kKind, kInvNorm>(a, g, p.index(), p.value()) : 0.f;
  const float d_n = q.found() ? exact_distance<T, kKind, kInvNorm>(a, g, q.index(), q.value()) : 0.f;
  if (threadIdx.x % kWarpSize != 0) return;
  const bool kept = p.found() && q.found();
  float term, slope;
  term_and_slope<kSoft>(d_p - d_n, a.margin, term, slope);
  a.pos_index[g] = p.found() ? p.index() : -1;
  a.pos_dist[g] = d_p;
  a.neg_index[g] = q.found() ? q.index() : -1;
  a.neg_dist[g] = d_n;
  a.loss[g] = kept ? term : 0.f;
  a.slope[g] = poisoned ? NAN : (kept ? slope : 0.f);
  if (a.kept != nullptr) a.kept[g] = kept ? 1.f : 0.f;
}

// Two blocks per SM declared: without it ptxas spilled 4 bytes in the euclidean soft-margin variants
// (sm_90), with it 72-96 registers and no spills.
template <typename T, int kKind, bool kInvNorm, bool kSoft>
__global__ void __launch_bounds__(kMineThreads, 2) triplet_mine_kernel(const MineArgs a) {
  constexpr int kWarps = kMineThreads / kWarpSize;
  static_assert(kWarps == kMineRows, "the epilogue takes one row per warp");
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
  bool poison = false;  // a row of x seen holds a NaN or inf
  for (int64_t j = threadIdx.x; j < a.n; j += kMineThreads) {
    const int64_t label_c = a.labels[j];
    const float inv_c = kInvNorm ? a.inv_norm[j] : 1.f;
    const float e_c = a.sq[j] * inv_c * inv_c;
    poison = poison || a.sq[a.n + j] != 0.f;
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
  const bool poisoned = __syncthreads_or(poison);
  if (warp >= rows) return;
  const int r = warp;  // the epilogue: one warp per row, every lane alike
  Best<true> p;
  Best<false> q;
  for (int w = 0; w < kWarps; ++w) {  // a fixed order; the result does not depend on it anyway
    p.take(sv[0][w][r], si[0][w][r]);
    q.take(sv[1][w][r], si[1][w][r]);
  }
  write_mined<T, kKind, kInvNorm, kSoft>(a, a.row0 + local0 + r, p, q, poisoned);
}

// Batch-hard mining on tensor-core tiles (tile_product, csrc/tiles.cuh): a block of 4
// warps owns 64 anchors, staged once over the full width in dynamic shared memory, and sweeps all n
// rows in tiles of 64; each warp forms its 16 x 64 block of the Gram matrix in fp32 fragments, turns
// it into distances and keeps, per anchor and lane, the farthest positive and nearest negative. The
// 4 lanes of an anchor merge (xor 1, 2), and each warp finishes its 16 anchors with write_mined. One
// launch at any n; no Gram block reaches device memory.
constexpr int kMineTileWarps = 4;
constexpr int kMineTileThreads = kMineTileWarps * kWarpSize;
constexpr int kMineTileRows = 16 * kMineTileWarps;  // anchors per block
constexpr int64_t kMineTileStaticSmem = sizeof(StagedTile) + kTileCols * (sizeof(int64_t) + 2 * sizeof(float)) +
                                        2 * kMineTileRows * (sizeof(float) + sizeof(int));

// The resident anchors' dynamic shared memory at width d (per_word elements per operand word).
__host__ __device__ constexpr int64_t mine_tiles_smem(int64_t d, int per_word) {
  return kMineTileRows * resident_stride(d, per_word) * static_cast<int64_t>(sizeof(uint32_t));
}

// What the tiled mining kernels read of x.
struct TileMineInputs {
  const void* x;
  const int64_t* labels;
  const float* sq;        // squared row norms, then per row 1 if it holds a NaN or inf (2n values)
  const float* inv_norm;  // per row 1 / max(|x_i|, eps), or nullptr
  int64_t n, d;
  bool vec;  // 16-byte loads: rows a multiple of 16 bytes, x 16-byte aligned
};

// The lane's two anchors: rows g and g + 8 of its warp's 16 (rows past n mine too, unwritten).
struct TileAnchors {
  int64_t row[2], label[2];
  float inv[2], e[2];  // inverse norm (1 without inv_norm) and scaled squared norm
};

// The lane's anchors of the 16-row tile from row `first` on.
template <bool kInvNorm>
__device__ __forceinline__ TileAnchors anchors_at(const TileMineInputs& in, int64_t first) {
  const int lane = threadIdx.x % kWarpSize;
  TileAnchors an;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    an.row[h] = first + lane / 4 + 8 * h;
    const int64_t c = an.row[h] < in.n ? an.row[h] : in.n - 1;
    an.label[h] = in.labels[c];
    an.inv[h] = kInvNorm ? in.inv_norm[c] : 1.f;
    an.e[h] = in.sq[c] * an.inv[h] * an.inv[h];
  }
  return an;
}

// The warp's 16 of the block's anchors from row0 on.
template <bool kInvNorm>
__device__ __forceinline__ TileAnchors tile_anchors(const TileMineInputs& in, int64_t row0) {
  return anchors_at<kInvNorm>(in, row0 + threadIdx.x / kWarpSize * 16);
}

// Column j0 + threadIdx.x's label, inverse norm (1 without inv_norm) and scaled squared norm, into the
// tile's shared arrays (threads below kTileCols); whether that column is a row of x.
__device__ __forceinline__ bool stage_column_values(const TileMineInputs& in, int64_t j0, bool has_inv,
                                                    int64_t* s_label, float* s_inv, float* s_e) {
  const int64_t j = j0 + threadIdx.x;
  const bool inside = j < in.n;
  const float inv_c = has_inv && inside ? in.inv_norm[j] : 1.f;
  s_label[threadIdx.x] = inside ? in.labels[j] : 0;
  s_inv[threadIdx.x] = inv_c;
  s_e[threadIdx.x] = inside ? in.sq[j] * inv_c * inv_c : 0.f;
  return inside;
}

// Stages the block's 64 anchors once, then sweeps all n rows in tiles of 64: fold(h, j, d, same) for
// each of the lane's Gram entries (anchor h, column j < n, distance d, whether row j has the anchor's
// label). Returns, in every thread, whether a row of x holds a NaN or inf (a block-wide OR, which is
// also the barrier after the sweep).
template <typename T, int kKind, bool kInvNorm, typename Fold>
__device__ __forceinline__ bool sweep_tiles(const TileMineInputs& in, const TileAnchors& an, int64_t row0,
                                            Fold&& fold) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, t = lane % 4;
  const T* x = static_cast<const T*>(in.x);
  const TileOperands<T> op{x, x, row0, in.n, in.n, in.d, in.vec};
  __shared__ StagedTile s_other;
  __shared__ int64_t s_label[kTileCols];
  __shared__ float s_inv[kTileCols], s_e[kTileCols];  // the tile's inverse norms and scaled squared norms
  LOSSFORGE_DYNAMIC_SMEM(uint32_t, s_own);
  stage_resident<T, kMineTileRows>(s_own, op);
  bool poison = false;
  for (int64_t j0 = 0; j0 < in.n; j0 += kTileCols) {
    float acc[8][4] = {};
    tile_product<T, kMineTileRows, true>(acc, s_own, static_cast<int>(resident_stride<T>(in.d)), s_other, op, j0,
                                         warp * 16, 0, lane, [&] {
      if (threadIdx.x < kTileCols) {
        const bool inside = stage_column_values(in, j0, kInvNorm, s_label, s_inv, s_e);
        poison = poison || (inside && in.sq[in.n + j0 + threadIdx.x] != 0.f);
      }
    });
    // The lane's entries: rows g, g + 8 (h), columns 8 n + 2 t + e of the tile.
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int local = n * 8 + 2 * t + e;
        const int64_t j = j0 + local;
        if (j >= in.n) continue;
        const int64_t label_c = s_label[local];
        const float inv_c = s_inv[local], e_c = s_e[local];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          fold(h, j, distance<kKind, kInvNorm>(acc[n][2 * h + e], an.inv[h], an.e[h], inv_c, e_c),
               label_c == an.label[h]);
        }
      }
    }
  }
  return __syncthreads_or(poison);
}

template <typename T, int kKind, bool kInvNorm, bool kSoft>
__global__ void __launch_bounds__(kMineTileThreads) triplet_mine_tiles_kernel(const MineArgs a) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMineTileRows;
  const TileMineInputs in{a.x, a.labels, a.sq, a.inv_norm, a.n, a.d, a.vec};
  const TileAnchors an = tile_anchors<kInvNorm>(in, row0);
  Best<true> pos[2];
  Best<false> neg[2];
  const bool poisoned = sweep_tiles<T, kKind, kInvNorm>(in, an, row0, [&](int h, int64_t j, float d, bool same) {
    if (!same) {
      neg[h].take(d, static_cast<int>(j));
    } else if (j != an.row[h]) {
      pos[h].take(d, static_cast<int>(j));
    }
  });
  __shared__ float s_v[2][kMineTileRows];  // the anchors' mined (positive, negative) after the merge
  __shared__ int s_i[2][kMineTileRows];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    pos[h].warp_reduce<4>();
    neg[h].warp_reduce<4>();
    if (lane % 4 == 0) {
      const int local = warp * 16 + lane / 4 + 8 * h;
      s_v[0][local] = pos[h].v;
      s_i[0][local] = pos[h].i;
      s_v[1][local] = neg[h].v;
      s_i[1][local] = neg[h].i;
    }
  }
  __syncwarp();  // each warp finishes its own 16 anchors
  for (int r = 0; r < 16; ++r) {  // the epilogue: the warp's anchors one at a time, every lane alike
    const int local = warp * 16 + r;
    if (row0 + local >= a.n) break;
    Best<true> p;
    Best<false> q;
    p.v = s_v[0][local], p.i = s_i[0][local];
    q.v = s_v[1][local], q.i = s_i[1][local];
    write_mined<T, kKind, kInvNorm, kSoft>(a, row0 + local, p, q, poisoned);
  }
}

// semi_hard's choices for the anchors' positive slots, on the same tiles (the register path; contract:
// ops/triplet.py's triplet_semi_hard_mine): per anchor and filled slot p the nearest negative strictly
// beyond d_ap[p] (Gram-form distances throughout), ties to the smallest column, else the anchor's
// farthest negative, which is also every slot's choice when it is a NaN. Each lane keeps its two
// anchors' slots in registers over the columns it holds; the 4 lanes of an anchor merge at the end.
// The slots' d_ap stay in registers for bf16/fp16 rows; for fp32 rows, whose three-way split of the tile
// product needs more registers, in shared memory (in registers they took fp32 to 255 and spills), and
// the kernel asks for one block per SM (ptxas otherwise held it at 168 registers, and spilled).
constexpr int kPosSlots = 16;  // ops/triplet.py's POS_SLOTS
template <typename T>
constexpr bool kSlotsInSmem = mma::kPerWord<T> == 1;

// The tiled mining kernels' static shared memory (per_word elements per operand word), the larger of
// the two: sweep_tiles' staged tile and column values, with the mining kernel's merge arrays or, for
// fp32, semi_hard's slot thresholds.
__host__ __device__ constexpr int64_t mine_tiles_static_smem(int per_word) {
  return kMineTileStaticSmem + (per_word == 1 ? kMineTileRows * kPosSlots * static_cast<int64_t>(sizeof(float)) : 0);
}

struct SemiHardArgs {
  TileMineInputs in;
  const int64_t* n_pos;   // (n,) filled slots per anchor
  const float* pos_dist;  // (n, kPosSlots) d_ap per slot
  int64_t* chosen;        // (n, kPosSlots): the negative, -1 for an empty slot or an anchor without one
  float* chosen_dist;     // (n, kPosSlots): its distance, 0 where none
};

template <typename T, int kKind, bool kInvNorm>
__global__ void __launch_bounds__(kMineTileThreads, kSlotsInSmem<T> ? 1 : 0)
    triplet_semi_hard_tiles_kernel(const SemiHardArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMineTileRows;
  const TileAnchors an = tile_anchors<kInvNorm>(a.in, row0);
  constexpr bool kShared = kSlotsInSmem<T>;
  float d_ap[2][kShared ? 1 : kPosSlots];
  alignas(16) __shared__ float s_dap[kShared ? kMineTileRows : 1][kPosSlots];  // rows of 16-byte vectors
  const int first = threadIdx.x / kWarpSize * 16 + lane / 4;  // the lane's anchors: first, first + 8
  int64_t used[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t c = an.row[h] < a.in.n ? an.row[h] : a.in.n - 1;
    used[h] = a.n_pos[c];
    if constexpr (kShared) {  // the anchor's 4 lanes write a quarter each (read after sweep_tiles' barriers)
      for (int p = lane % 4; p < kPosSlots; p += 4) {
        s_dap[first + 8 * h][p] = p < used[h] ? a.pos_dist[c * kPosSlots + p] : 0.f;
      }
    } else {
#pragma unroll
      for (int p = 0; p < kPosSlots; ++p) d_ap[h][p] = p < used[h] ? a.pos_dist[c * kPosSlots + p] : 0.f;
    }
  }
  Best<false> near[2][kPosSlots];
  Best<true> far[2];
  sweep_tiles<T, kKind, kInvNorm>(a.in, an, row0, [&](int h, int64_t j, float d, bool same) {
    if (same) return;
    far[h].take(d, static_cast<int>(j));
#pragma unroll
    for (int p = 0; p < kPosSlots; ++p) {  // an empty slot's work is discarded below (no branch per slot)
      float threshold;
      if constexpr (kShared) {
        threshold = s_dap[first + 8 * h][p];
      } else {
        threshold = d_ap[h][p];
      }
      if (d > threshold) near[h][p].take(d, static_cast<int>(j));  // never a NaN
    }
  });
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    far[h].warp_reduce<4>();
#pragma unroll
    for (int p = 0; p < kPosSlots; ++p) near[h][p].warp_reduce<4>();
    if (lane % 4 != 0 || an.row[h] >= a.in.n) continue;
    const bool has_neg = far[h].found();
    const float far_v = far[h].value();
#pragma unroll
    for (int p = 0; p < kPosSlots; ++p) {
      const bool found = near[h][p].found() && !isnan(far_v);
      const bool kept = p < used[h] && has_neg;
      const int64_t at = an.row[h] * kPosSlots + p;
      a.chosen[at] = kept ? (found ? near[h][p].index() : far[h].index()) : -1;
      a.chosen_dist[at] = kept ? (found ? near[h][p].value() : far_v) : 0.f;
    }
  }
}

// kept[i] = 1 where anchor i has a positive and a negative: one thread per anchor against tiles of
// the labels in shared memory; a block stops once each of its anchors has both.
constexpr int kKeptThreads = 256;

__global__ void __launch_bounds__(kKeptThreads)
    triplet_kept_kernel(const int64_t* __restrict__ labels, float* __restrict__ kept, int64_t n) {
  __shared__ int64_t tile[kKeptThreads];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kKeptThreads + threadIdx.x;
  const int64_t label = i < n ? labels[i] : 0;
  bool pos = false, neg = false;
  for (int64_t t0 = 0; t0 < n; t0 += kKeptThreads) {
    if (!__syncthreads_or(i < n && !(pos && neg))) break;  // (also the barrier before the tile is refilled)
    if (t0 + threadIdx.x < n) tile[threadIdx.x] = labels[t0 + threadIdx.x];
    __syncthreads();
    const int m = static_cast<int>(std::min<int64_t>(kKeptThreads, n - t0));
    for (int c = 0; c < m; ++c) {
      const bool same = tile[c] == label;
      pos = pos || (same && t0 + c != i);
      neg = neg || !same;
    }
  }
  if (i < n) kept[i] = pos && neg ? 1.f : 0.f;
}

// The pair gradient: a block owns kGradRows rows x kGradThreads features (one per thread), its
// sums in shared memory (each thread its own column: no races). The rows' own two pairs first, then
// the anchors in chunks of kGradThreads: each thread tests one anchor's partners against the block's
// rows, a ballot compacts the hits in anchor order, and every thread adds them in that order.
constexpr int kGradRows = 32;
constexpr int kGradThreads = 256;

struct PairGradArgs {
  const void* x;
  const float* inv_norm;  // or nullptr
  const int64_t* pos_index;
  const float* pos_dist;
  const int64_t* neg_index;
  const float* neg_dist;
  const float* slope;
  const float* weight;
  int64_t weight_step;    // 0: one weight for every anchor
  void* grad_x;           // GradOut<T, kInvNorm>
  int64_t n, d;
};

template <int kKind>
struct AnchorCoefs {
  float pos, neg;
  __device__ __forceinline__ AnchorCoefs(const PairGradArgs& a, int64_t anchor, bool kept) {
    const float s = a.slope[anchor];
    const float w = kept ? s * a.weight[anchor * a.weight_step] : 0.f;
    const float poison = isnan(s) ? NAN : 0.f;
    pos = grad_factor<kKind>(a.pos_dist[anchor]) * w + poison;
    neg = poison - grad_factor<kKind>(a.neg_dist[anchor]) * w;
  }
};

template <bool kCentered>
__device__ __forceinline__ float pair_term(float c, float v_r, float v_o) {
  return kCentered ? c * (v_r - v_o) : -(c * v_o);
}

// grad_x's element type: x's, or fp32 with inv_norm (the caller completes it through the normalisation)
template <typename T, bool kInvNorm>
using GradOut = std::conditional_t<kInvNorm, float, T>;

template <typename T, bool kInvNorm>
__device__ __forceinline__ float scaled_elem(const PairGradArgs& a, int64_t row, int64_t k) {
  return load_elem(static_cast<const T*>(a.x) + row * a.d + k) * (kInvNorm ? a.inv_norm[row] : 1.f);
}

template <typename T, int kKind, bool kInvNorm>
__global__ void __launch_bounds__(kGradThreads) triplet_pair_grad_kernel(const PairGradArgs a) {
  constexpr bool kCentered = kKind != kCosine;
  constexpr int kWarps = kGradThreads / kWarpSize;
  __shared__ float g[kGradRows][kGradThreads];
  __shared__ int hits[kGradThreads];
  __shared__ int warp_hits[kWarps];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGradRows;
  const int rows = static_cast<int>(std::min<int64_t>(kGradRows, a.n - r0));
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kGradThreads + threadIdx.x;
  const bool live = k < a.d;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int r = 0; r < rows; ++r) {  // own pairs; a left-out anchor's partner is itself (coefficient 0 or NaN)
    const int64_t row = r0 + r, p = a.pos_index[row], q = a.neg_index[row];
    const AnchorCoefs<kKind> c(a, row, p >= 0 && q >= 0);
    if (!live) continue;
    const float v_r = scaled_elem<T, kInvNorm>(a, row, k);
    g[r][threadIdx.x] = pair_term<kCentered>(c.pos, v_r, scaled_elem<T, kInvNorm>(a, p >= 0 ? p : row, k)) +
                        pair_term<kCentered>(c.neg, v_r, scaled_elem<T, kInvNorm>(a, q >= 0 ? q : row, k));
  }
  for (int64_t a0 = 0; a0 < a.n; a0 += kGradThreads) {
    const int64_t anchor = a0 + threadIdx.x;
    bool hit = false;
    if (anchor < a.n) {
      const int64_t p = a.pos_index[anchor] - r0, q = a.neg_index[anchor] - r0;
      hit = (p >= 0 && p < rows) || (q >= 0 && q < rows);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int base = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      base += w < warp ? warp_hits[w] : 0;
      total += warp_hits[w];
    }
    if (hit) hits[base + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(anchor);
    __syncthreads();
    for (int h = 0; h < total && live; ++h) {  // in anchor order
      const int64_t b = hits[h], p = a.pos_index[b], q = a.neg_index[b];
      const AnchorCoefs<kKind> c(a, b, p >= 0 && q >= 0);
      const float v_b = scaled_elem<T, kInvNorm>(a, b, k);
      if (p - r0 >= 0 && p - r0 < rows) {
        g[p - r0][threadIdx.x] += pair_term<kCentered>(c.pos, scaled_elem<T, kInvNorm>(a, p, k), v_b);
      }
      if (q - r0 >= 0 && q - r0 < rows) {
        g[q - r0][threadIdx.x] += pair_term<kCentered>(c.neg, scaled_elem<T, kInvNorm>(a, q, k), v_b);
      }
    }
    __syncthreads();  // before the next chunk's hits are written
  }
  if (!live) return;
  for (int r = 0; r < rows; ++r) {
    const float inv_r = kInvNorm ? a.inv_norm[r0 + r] : 1.f;
    store_elem(static_cast<GradOut<T, kInvNorm>*>(a.grad_x) + (r0 + r) * a.d + k, g[r][threadIdx.x] * inv_r);
  }
}

// ---- semi_hard and batch_all: one block per anchor row of a C x B Gram block ----

constexpr int kRowThreads = 256;
constexpr int kRowGroup = 8;   // batch_all: positives taken together (one slope sum each per thread)
constexpr int kSemiGroup = 4;  // semi_hard: fewer, as each keeps a running best (value, index) per thread

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

// ---- the register path's pair distances and list gradient ----

constexpr int kPairWarps = 8;  // entries per block: one warp each

struct PairDistanceArgs {
  const void* x;
  const float* inv_norm;  // or nullptr
  const int64_t* first;
  const int64_t* second;
  float* gram;
  float* exact;
  int64_t entries, d;
};

// Per entry e, one warp: rows p = first[e], q = second[e]; their dot product, squared norms and
// squared difference (of v = inv_norm * x) summed in fp32 in one pass, then the Gram-form distance
// (as the mining compares it) and the exact one from the difference (cosine, or a Gram form that is
// NaN or inf: the Gram form). q < 0 (and p < 0: no row is read) writes 0 to both.
template <typename T, int kKind, bool kInvNorm>
__global__ void __launch_bounds__(kPairWarps * kWarpSize) triplet_pair_distances_kernel(const PairDistanceArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kPairWarps;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kPairWarps + threadIdx.x / kWarpSize; e < a.entries;
       e += step) {  // (every lane of a warp alike)
    const int64_t p = a.first[e], q = a.second[e];
    float gram = 0.f, exact = 0.f;
    if (p >= 0 && q >= 0) {
      const float inv_p = kInvNorm ? a.inv_norm[p] : 1.f, inv_q = kInvNorm ? a.inv_norm[q] : 1.f;
      float dot = 0.f, sq_p = 0.f, sq_q = 0.f, diff = 0.f;
      for (int64_t k = lane; k < a.d; k += kWarpSize) {
        const float x_p = load_elem(x + p * a.d + k), x_q = load_elem(x + q * a.d + k);
        dot = fmaf(x_p, x_q, dot);
        if constexpr (kKind != kCosine) {
          sq_p = fmaf(x_p, x_p, sq_p);
          sq_q = fmaf(x_q, x_q, sq_q);
          const float t = x_p * inv_p - x_q * inv_q;
          diff = fmaf(t, t, diff);
        }
      }
      dot = warp_sum(dot);
      if constexpr (kKind != kCosine) {
        sq_p = warp_sum(sq_p);
        sq_q = warp_sum(sq_q);
        diff = warp_sum(diff);
      }
      gram = distance<kKind, kInvNorm>(dot, inv_p, sq_p * inv_p * inv_p, inv_q, sq_q * inv_q * inv_q);
      exact = gram;
      if (kKind != kCosine && fabsf(gram) < INFINITY) {
        exact = kKind == kSquaredEuclidean ? diff : sqrtf(diff + kEuclideanEps);
      }
    }
    if (lane == 0) {
      a.gram[e] = gram;
      a.exact[e] = exact;
    }
  }
}

constexpr int kListRows = 8;    // rows per block: one warp each
constexpr int kListUnroll = 4;  // features per lane at once: a list entry is read once per 128 features

struct ListGradArgs {
  const void* x;
  const float* inv_norm;   // or nullptr
  const float* grad_rows;  // fp32 (n, d), or nullptr
  const int64_t* offsets;
  const int64_t* others;
  const float* coef;
  void* grad_x;            // GradOut<T, kInvNorm>
  int64_t n, d;
};

// Row r, one warp, lanes over the features: g = grad_rows[r] (or 0) plus the entries of r's list in
// list order, coef * (v_r - v_other) (centered) or -coef * v_other, an entry of other < 0 skipped;
// writes inv_norm_r * g in x's dtype (fp32 with inv_norm).
template <typename T, bool kInvNorm, bool kCentered>
__global__ void __launch_bounds__(kListRows * kWarpSize) triplet_list_grad_kernel(const ListGradArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kListRows + threadIdx.x / kWarpSize;
  if (row >= a.n) return;  // (a whole warp)
  const T* x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t begin = a.offsets[row], end = a.offsets[row + 1];
  const float inv_r = kInvNorm ? a.inv_norm[row] : 1.f;
  for (int64_t k0 = lane; k0 < a.d; k0 += kWarpSize * kListUnroll) {
    const int64_t at = row * a.d + k0;  // this lane's features: at + u * kWarpSize
    bool live[kListUnroll];
    float v_r[kListUnroll], g[kListUnroll];
#pragma unroll
    for (int u = 0; u < kListUnroll; ++u) {
      live[u] = k0 + u * kWarpSize < a.d;
      v_r[u] = live[u] ? load_elem(x + at + u * kWarpSize) * inv_r : 0.f;
      g[u] = a.grad_rows != nullptr && live[u] ? a.grad_rows[at + u * kWarpSize] : 0.f;
    }
    for (int64_t j = begin; j < end; ++j) {
      const int64_t o = a.others[j];
      if (o < 0) continue;
      const float c = a.coef[j], inv_o = kInvNorm ? a.inv_norm[o] : 1.f;
      const T* x_o = x + o * a.d + k0;
#pragma unroll
      for (int u = 0; u < kListUnroll; ++u) {
        if (live[u]) g[u] += pair_term<kCentered>(c, v_r[u], load_elem(x_o + u * kWarpSize) * inv_o);
      }
    }
#pragma unroll
    for (int u = 0; u < kListUnroll; ++u) {
      if (live[u]) store_elem(static_cast<GradOut<T, kInvNorm>*>(a.grad_x) + at + u * kWarpSize, g[u] * inv_r);
    }
  }
}


// ---- batch_all's register path on tiles (bf16) ----
//
// triplet_batch_all_tiles_kernel (contract: ops/triplet.py's triplet_batch_all_rows): a block of 8 warps
// owns 32 anchors, resident in shared memory, and sweeps all n rows in 64-row tiles, each staged once
// over the full width and used for both products:
//   1. the Gram tile (32 x 64; the warps split it as the contrastive backward does: 2 row tiles x 4
//      groups of 16 columns) from mma.sync;
//   2. each lane's entries: the distance, whether the column is a negative, the anchor's filled slots
//      against it (loss, count, per-slot slope sums, kept in registers) and the column's slots (staged
//      per tile from pos_dist); coef = -(both sides' slope sums, each times its row weight) x the
//      distance's factor (x the column's inverse norm), rounded to bf16 into shared memory as A
//      fragments (two adjacent 8-column C tiles are one k16 step);
//   3. acc (32 x D fp32, shared memory) += coef . tile rows, the B fragments read across the staged rows.
// Per-row sums merge in a fixed order (lanes, then the 4 warps of a row tile); grad_rows =
// (sum_j coef) v_a - acc. No Gram or coefficient byte reaches device memory and nothing is accumulated
// across blocks. fp16 coefficients are scaled per anchor row before they are rounded (scale_row_weights):
// 'mean' weights and euclidean's 1 / d, unbounded before the distances are seen, would leave fp16's
// range. Loads: (B / 32) B D e bytes of tiles.
constexpr int kAllWarps = 8;
constexpr int kAllThreads = kAllWarps * kWarpSize;
constexpr int kAllRowTiles = 2;
constexpr int kAllRows = 16 * kAllRowTiles;                      // anchors per block
constexpr int kAllWarpsPerRowTile = kAllWarps / kAllRowTiles;    // the column groups
constexpr int kAllSimTiles = kTileCols / 8 / kAllWarpsPerRowTile;  // 8-column Gram tiles per warp
constexpr int kAllAccPad = 8;                                    // floats past each accumulator row
// Static shared memory (per_word elements per operand word: the coefficients' words per row).
constexpr int64_t batch_all_static_smem(int per_word) {
  return kAllRows * (kTileCols / per_word + 4) * static_cast<int64_t>(sizeof(uint32_t)) +
         kTileCols * (sizeof(int64_t) + 3 * sizeof(float) + sizeof(int) + kPosSlots * sizeof(float)) +
         kAllWarpsPerRowTile * kAllRows * (2 * sizeof(float) + sizeof(int)) +
         kAllRows * sizeof(float);  // (fp16: the rows' unscaling)
}

__host__ __device__ constexpr int64_t batch_all_acc_stride(int64_t d) { return (d + 15) / 16 * 16 + kAllAccPad; }

// Dynamic shared memory at width d: the anchors and the tile (resident_stride words per row), the accumulator.
__host__ __device__ constexpr int64_t batch_all_tiles_smem(int64_t d, int per_word) {
  return ((kAllRows + kTileCols) * resident_stride(d, per_word) + kAllRows * batch_all_acc_stride(d)) *
         static_cast<int64_t>(sizeof(float));
}

struct BatchAllArgs {
  TileMineInputs in;
  const int64_t* n_pos;      // (n,) filled slots per anchor
  const float* pos_dist;     // (n, kPosSlots) exact d_ap per slot
  const float* row_weight;   // (n,), with grad_rows; else nullptr
  float* loss;
  int64_t* count;
  float* pos_slope;          // (n, kPosSlots)
  float* grad_rows;          // (n, d) fp32, or nullptr
  float margin;
  bool soft;                 // soft margin
  int acc_stride;            // batch_all_acc_stride(d)
};

// One instantiation per distance: inv_norm enters as factors of 1 where absent (exact), and the soft
// margin is a runtime choice (a uniform branch), to keep the instantiations few.
template <typename T, int kKind>
__global__ void __launch_bounds__(kAllThreads, 1) triplet_batch_all_tiles_kernel(const BatchAllArgs a) {
  constexpr bool kScaled = std::is_same<T, c10::Half>::value;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, t = lane % 4;
  const int rt = warp / kAllWarpsPerRowTile, part = warp % kAllWarpsPerRowTile;  // row tile, column group
  const int col0 = part * kAllSimTiles * 8;
  const TileMineInputs& in = a.in;
  const T* x = static_cast<const T*>(in.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kAllRows;
  const int stride = static_cast<int>(resident_stride<T>(in.d));
  const bool grad = a.grad_rows != nullptr, has_inv = in.inv_norm != nullptr, soft = a.soft;  // grid-uniform
  LOSSFORGE_DYNAMIC_SMEM(uint32_t, smem);
  uint32_t* s_own = smem;
  uint32_t* s_tile = s_own + kAllRows * stride;
  float* s_acc = reinterpret_cast<float*>(s_tile + kTileCols * stride);
  constexpr int kAcross = kAcrossStride<T>;
  constexpr int kWSteps = kTileCols / mma::kStepK<T>;  // k steps of the coefficients' product
  __shared__ uint32_t s_w[kAllRows][kAcross];  // the tile's coefficients as A fragments: 32 anchors x 64 columns
  __shared__ int64_t s_label[kTileCols];
  __shared__ float s_inv[kTileCols], s_e[kTileCols], s_wc[kTileCols];
  __shared__ int s_npos[kTileCols];
  __shared__ float s_slots[kTileCols][kPosSlots];  // the columns' own positive distances
  __shared__ float s_sums[2][kAllWarpsPerRowTile][kAllRows];
  __shared__ int s_count[kAllWarpsPerRowTile][kAllRows];
  __shared__ float s_unscale[kAllRows];

  TileAnchors an = anchors_at<false>(in, row0 + rt * 16);
  float d_ap[2][kPosSlots], w_pos[2][kPosSlots], total[2] = {0.f, 0.f}, g_sum[2] = {0.f, 0.f}, w_r[2];
  int count[2] = {0, 0}, used[2], shift[1][2] = {{126, 126}};
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    live[h] = an.row[h] < in.n;
    const int64_t c = live[h] ? an.row[h] : in.n - 1;
    if (has_inv) {
      an.inv[h] = in.inv_norm[c];
      an.e[h] = in.sq[c] * an.inv[h] * an.inv[h];
    }
    used[h] = static_cast<int>(min(a.n_pos[c], static_cast<int64_t>(kPosSlots)));
    w_r[h] = grad ? a.row_weight[c] : 0.f;
#pragma unroll
    for (int p = 0; p < kPosSlots; ++p) {
      d_ap[h][p] = p < used[h] ? a.pos_dist[c * kPosSlots + p] : 0.f;
      w_pos[h][p] = 0.f;
    }
  }
  stage_resident<T, kAllRows>(s_own, TileOperands<T>{x, x, row0, in.n, in.n, in.d, in.vec});
  if (grad) {
    for (int i = threadIdx.x; i < kAllRows * a.acc_stride; i += blockDim.x) s_acc[i] = 0.f;
  }

  for (int64_t j0 = 0; j0 < in.n; j0 += kTileCols) {
    __syncthreads();  // the previous tile's reads are done (first: the anchors are staged)
    stage_resident<T, kTileCols>(s_tile, TileOperands<T>{x, x, j0, in.n, in.n, in.d, in.vec});
    if (threadIdx.x < kTileCols) {
      const int64_t j = j0 + threadIdx.x;
      const bool inside = stage_column_values(in, j0, has_inv, s_label, s_inv, s_e);
      s_npos[threadIdx.x] = inside ? static_cast<int>(min(a.n_pos[j], static_cast<int64_t>(kPosSlots))) : 0;
      s_wc[threadIdx.x] = grad && inside ? a.row_weight[j] : 0.f;
    }
    for (int i = threadIdx.x; i < kTileCols * kPosSlots; i += blockDim.x) {
      const int c = i / kPosSlots, q = i % kPosSlots;
      const int64_t j = j0 + c;
      s_slots[c][q] = j < in.n && q < a.n_pos[j] ? a.pos_dist[j * kPosSlots + q] : 0.f;
    }
    __syncthreads();

    float sim[kAllSimTiles][4] = {};
    const uint32_t* a_rows = s_own + rt * 16 * stride;
    constexpr int kStep = mma::kStepK<T>;
    for (int ks = 0; ks < static_cast<int>((in.d + kStep - 1) / kStep); ++ks) {
      uint32_t fa[4];
      mma::load_a(fa, a_rows + ks * 8, stride, lane);
#pragma unroll
      for (int n = 0; n < kAllSimTiles; ++n) {
        uint32_t fb[2];
        mma::load_b(fb, s_tile + (col0 + n * 8) * stride + ks * 8, stride, lane);
        mma::mma_step<T>(sim[n], fa, fb);
      }
    }

    // The lane's entries: anchors g, g + 8 (h) of the row tile, columns col0 + 8 n + 2 t + e.
    float coef[kAllSimTiles][2][2];
#pragma unroll
    for (int n = 0; n < kAllSimTiles; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int local = col0 + n * 8 + 2 * t + e;
          const bool neg = live[h] && j0 + local < in.n && s_label[local] != an.label[h];
          const float dist = distance<kKind, true>(sim[n][2 * h + e], an.inv[h], an.e[h], s_inv[local], s_e[local]);
          float from_rows = 0.f;
#pragma unroll
          for (int p = 0; p < kPosSlots; ++p) {
            if (!neg || p >= used[h]) continue;
            float term, slope;
            term_and_slope(soft, d_ap[h][p] - dist, a.margin, term, slope);
            total[h] += term;
            count[h] += !soft && slope > 0.f ? 1 : 0;  // (soft margin: no count)
            w_pos[h][p] += slope;
            from_rows += slope;
          }
          coef[n][h][e] = 0.f;
          if (grad && neg) {
            float from_cols = 0.f;
            for (int q = 0; q < s_npos[local]; ++q) {
              float term, slope;
              term_and_slope(soft, s_slots[local][q] - dist, a.margin, term, slope);
              from_cols += slope;
            }
            // the operand's value: x the column's inverse norm (1 without inv_norm)
            coef[n][h][e] = -(from_rows * w_r[h] + from_cols * s_wc[local]) * grad_factor<kKind>(dist) *
                            s_inv[local];
          }
        }
      }
    }
    if (!grad) continue;

    float rescale[1][2] = {{1.f, 1.f}};
    if constexpr (kScaled) {
      scale_row_weights<kAllSimTiles, kAllRows, kAllWarpsPerRowTile, 1>(coef, shift, rescale, &s_sums[0][0][0], rt,
                                                                        rt, part, lane);
    }
    // The row sums take the coefficients as the product does, rounded to T: sum_j c_j (v_a - v_j) is
    // then formed from one value of each c_j. (With c_j unrounded there, a negative close to the anchor,
    // c_j ~ 1 / d large, left (c_j - T(c_j)) v_j of rounding in the row: 3 % of the gradient for bf16
    // rows 0.08 apart.)
#pragma unroll
    for (int n = 0; n < kAllSimTiles; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float down = kScaled ? ldexpf(1.f, -shift[0][h]) : 1.f;
        float w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          w[e] = as_stored<T>(coef[n][h][e]);
          if constexpr (kKind != kCosine) g_sum[h] += w[e] * down / s_inv[col0 + n * 8 + 2 * t + e];
        }
        store_pair<T>(s_w[rt * 16 + g + 8 * h], col0 + n * 8 + 2 * t, w[0], w[1]);
      }
    }

    __syncthreads();  // the coefficients are complete
    // the coefficients' A fragments: held for the sweep of the features for half rows; fp32's (twice
    // the k steps, each split three ways in mma_step) are loaded per feature tile, or ptxas spills them
    constexpr bool kHoldW = mma::kPerWord<T> == 2;
    uint32_t wa[kWSteps][4];
    auto load_w = [&] {
#pragma unroll
      for (int ks = 0; ks < kWSteps; ++ks) mma::load_a(wa[ks], &s_w[rt * 16][ks * 8], kAcross, lane);
    };
    if constexpr (kHoldW) load_w();
    const int feature_tiles = static_cast<int>((in.d + 7) / 8);
    for (int ft = part; ft < feature_tiles; ft += kAllWarpsPerRowTile) {
      if constexpr (!kHoldW) load_w();
      accumulate_rows<T>(s_acc, a.acc_stride, rt * 16, ft * 8, wa, lane, [&](uint32_t (&fb)[2], int ks) {
        load_b_across_rows<T>(fb, s_tile, stride, ks * kStep, ft * 8, lane);
      }, rescale[0][0], rescale[0][1]);
    }
  }

  // The row sums: the 4 lanes of an anchor (xor 1, then 2), then the row tile's warps in order.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      total[h] += __shfl_xor_sync(0xffffffffu, total[h], off);
      g_sum[h] += __shfl_xor_sync(0xffffffffu, g_sum[h], off);
      count[h] += __shfl_xor_sync(0xffffffffu, count[h], off);
#pragma unroll
      for (int p = 0; p < kPosSlots; ++p) w_pos[h][p] += __shfl_xor_sync(0xffffffffu, w_pos[h][p], off);
    }
  }
  __syncthreads();  // the sweep is done with the tile's shared memory: it holds the slot sums now
  float* s_slot_sums = reinterpret_cast<float*>(s_tile);  // [part][anchor][slot]
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = rt * 16 + g + 8 * h;
      s_sums[0][part][local] = total[h];
      s_sums[1][part][local] = g_sum[h];
      s_count[part][local] = count[h];
      if (kScaled && part == 0) s_unscale[local] = ldexpf(1.f, -shift[0][h]);  // (every part's shift is the same)
#pragma unroll
      for (int p = 0; p < kPosSlots; ++p) s_slot_sums[(part * kAllRows + local) * kPosSlots + p] = w_pos[h][p];
    }
  }
  __syncthreads();
  const int64_t rows_here = min(static_cast<int64_t>(kAllRows), in.n - row0);
  for (int i = threadIdx.x; i < rows_here * kPosSlots; i += blockDim.x) {
    const int local = i / kPosSlots, p = i % kPosSlots;
    float sum = 0.f;
    for (int q = 0; q < kAllWarpsPerRowTile; ++q) sum += s_slot_sums[(q * kAllRows + local) * kPosSlots + p];
    a.pos_slope[(row0 + local) * kPosSlots + p] = sum;
  }
  if (threadIdx.x < rows_here) {
    const int local = threadIdx.x;
    float loss = 0.f, coef_sum = 0.f;
    int64_t n_terms = 0;
    for (int q = 0; q < kAllWarpsPerRowTile; ++q) {
      loss += s_sums[0][q][local];
      coef_sum += s_sums[1][q][local];
      n_terms += s_count[q][local];
    }
    a.loss[row0 + local] = loss;
    a.count[row0 + local] = n_terms;
    s_sums[1][0][local] = coef_sum;
  }
  if (!grad) return;
  __syncthreads();
  // grad_rows = (sum_j coef) v_a - acc (cosine: -acc)
  for (int64_t i = threadIdx.x; i < rows_here * in.d; i += blockDim.x) {
    const int local = static_cast<int>(i / in.d);
    const int64_t k = i - local * in.d, row = row0 + local;
    const float acc = s_acc[local * a.acc_stride + k] * (kScaled ? s_unscale[local] : 1.f);  // exact
    float out = -acc;
    if constexpr (kKind != kCosine) {
      const float v = load_elem(x + row * in.d + k) * (has_inv ? in.inv_norm[row] : 1.f);
      out = fmaf(s_sums[1][0][local], v, out);
    }
    a.grad_rows[row * in.d + k] = out;
  }
}

}  // namespace triplet
}  // namespace lossforge

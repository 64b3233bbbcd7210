// The contrastive family's kernels: InfoNCE / CLIP, SupCon and SigLIP (contract: ops/contrastive.py's
// docstring). The checks, the chunk loops, the products and the launches are in contrastive.cu.
//
// The (B, M) similarity matrix never exists. It stays on chip: tile_stats_kernel (forward) forms
// 16 x 64 tiles of it per warp with tensor-core products (fp32 inputs as three tf32 products,
// csrc/mma.cuh) and folds them into the row statistics in registers; tile_grad_kernel (backward) turns
// each tile into pair weights in shared memory and multiplies them by the other rows on the tensor
// cores (bottom of the file). Only the backward of rows too wide for tile_grad_kernel's shared
// accumulator (128 bytes per feature: D above about 1600 bf16/fp16 or 1500 fp32 features on an H100)
// goes through chunks: contrastive.cu walks the rows in chunks, and each chunk's similarities
// S_c = x_c @ y^T come from cuBLAS (fp32 out, fp32 accumulation; fp32 inputs at torch's matmul
// precision). With c_ij = S_ij r_i r'_j (r the fp32 inverse row norms, 1 without `normalize`) and
// z_ij = s c_ij (+ b for SigLIP), s and b the logit scale and bias:
//   inv_norm_kernel     r_i = 1 / max(|x_i|, 1e-12) per row, and r_i^2 where the clamp is off
//                       (what the normalisation's backward subtracts), one warp per row.
//   weight_bound_kernel backward, once per pass: max_j r'_j and max_j |g_j| r'_j over the other
//                       side, from which each row's gradient weights get a bound (below).
//   pair_grad_kernel    backward, one block per chunk row: dZ from the saved stats, written as
//                       G = 2^e_i s dZ r'_j in the inputs' dtype so that one cuBLAS product G @ y gives
//                       2^e_i times the gradient before normalisation, plus the row sums that grad_coef
//                       and the normalisation need (the latter, sum_j G_ij S_ij, from G as stored: the
//                       tiled backward's reason, below). A row can carry two roles of the pair term:
//                       symmetric InfoNCE's row and column halves, or SupCon's anchor (dZ_ij) and key
//                       (dZ_ji, the same S entry because S is symmetric) roles.
//   finish_grad_kernel  grad_x = r (2^-e acc - coef r x) per row (2^-e acc without `normalize`), in x's
//                       dtype.
// Row scaling of G: with 'mean' over a large batch the weights s dZ r'_j are tiny (about s / (B M)),
// below fp16's smallest subnormal at B = M = 65536, so stored as they are most of them would round
// to 0. Every |dZ_ij| is at most w_own |g_i| + w_other |g_j| (each probability, sigmoid and 1/n lies
// in [0, 1]), so row i's weights are at most bound_i = |s| (w_own |g_i| max r' + w_other max |g| r');
// the exact power of two 2^e_i that brings bound_i just under 2^14 puts the row's largest weights
// near the top of fp16's range (4x headroom below 65504), and the many small ones, down to 2^-28 of
// bound_i, stay normal. The product accumulates in fp32 and finish_grad undoes 2^e_i exactly. With
// `normalize`, a row below the norm floor has r' = 1e12, which in the bound would flush every other
// weight of the row; in fp16 such a row is all zeros, so it weighs 0 in G and in the bound.
//
// Designed work per call, B x M pairs, width D, e = element bytes:
//   forward   one product (2BMD FLOPs), no S traffic; each block stages its 64 rows and every tile of
//             the other side through shared memory (2 x 64 x D x e bytes per tile, from L2 mostly):
//             (B / 64) M D e + B D e bytes of loads, twice and 2BMD FLOPs twice for symmetric.
//   backward  with grad_query and grad_key: four products (8BMD FLOPs). Chunked (wide rows): per pass
//             S written and read (8BM), G written and read (2eBM), so 2 x (8 + 2e) BM bytes.
//             Tiled: no S or G traffic; per pass each block of 32 rows stages every
//             other tile twice (rows for S, transposed for the gradient): (B / 32) x 2 M D e bytes
//             of loads (D e / 16 bytes per similarity, from L2 mostly), and its fp32 accumulator
//             (32 x D) is read and written in shared memory once per tile; one launch per pass
//             (tile_grad), device memory beyond the outputs: the inverse norms.
//
// Compile facts (nvcc 13.0, -O3, ptxas -v, sm_90): registers tile_stats 72-139 for bf16/fp16
// (InfoNCE 72, SigLIP 72-80, SupCon 105-139) and 179-215 for fp32 (one block per SM asked; 18.3-18.8
// KiB of static shared memory), tile_grad 72-106 for bf16/fp16 and 179-212 for fp32 (20.1-21.6 and
// 32.1-33.6 KiB of static shared memory, plus the fp32 accumulator's 128 bytes per feature of
// dynamic), pair_grad 30-76, finish_grad 28-32, inv_norm 32, finish_symmetric_tiles 10, weight_bound
// 20; no stack frame, no spills, no local memory in the SASS.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "enums.h"
#include "mma.cuh"
#include "row_softmax.cuh"
#include "tiles.cuh"

namespace lossforge {
namespace contrastive {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // loads in flight per thread in the row loops

template <bool kNorm>
__device__ __forceinline__ float inv_norm_at(const float* inv, int64_t i) {
  return kNorm ? inv[i] : 1.f;
}

// r'_j (ro) as the pair weights W = s dZ r'_j carry it: 0 for a clamped fp16 row, which is all zeros
// (no nonzero fp16 row has a norm below 1e-12), so that its r' = 1e12 stays out of the row scaling of
// fp16 weights. bf16 and fp32 rows keep r' (they can be nonzero there, and their range holds it).
template <typename T, bool kNorm>
__device__ __forceinline__ float weight_inv_norm(float ro, const float* proj, int64_t j) {
  return std::is_same_v<T, c10::Half> && kNorm && proj[j] == 0.f ? 0.f : ro;
}

// c = S r_a r_o, in one order for the forward and the backward so that both see the same logits.
__device__ __forceinline__ float pair_cos(float sim, float ra, float ro) { return sim * ra * ro; }

__device__ __forceinline__ float sigmoid(float t) { return 1.f / (1.f + expf(-t)); }

// The log-sum-exps follow torch.logsumexp on non-finite logits: a +inf logit makes the lse +inf (and
// the other logits' probabilities 0) rather than inf - inf = NaN. The online (max, sum) leaves +inf
// logits out (finite_top) and its users remember that one was seen; a NaN logit reaches the sum of
// exponentials, so it survives fmaxf (which skips NaN) in the max.
__device__ __forceinline__ float finite_top(float z, bool& pos_inf) {
  if (z == INFINITY) {
    pos_inf = true;
    return -INFINITY;
  }
  return z;
}

// lse from the (max, sum) of the logits other than +inf: +inf if there was one (NaN if a NaN
// reached the sum), else m + log(s).
__device__ __forceinline__ float lse_of(float m, float s, bool pos_inf) {
  return pos_inf ? (isnan(s) ? s : INFINITY) : m + logf(s);
}

// Max over the block (fmaxf: NaN is skipped), valid in thread 0; scratch holds one float per warp.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarpSize) ? scratch[lane] : 0.f;
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

// out = {max_j r'_j, max_j |g_j| r'_j} over the other side's n rows (r' = 1 without `normalize`,
// the second 0 without g; r' = 0 where zero_rows says a row weighs 0: proj 0, fp16); one block. fmaxf
// skips NaN: a NaN weight needs no bound, it stays NaN.
__global__ void __launch_bounds__(kThreads) weight_bound_kernel(const float* inv, const float* zero_rows,
                                                                const float* g, int64_t n, float* out) {
  float r_max = 0.f, gr_max = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float r = inv == nullptr ? 1.f : zero_rows != nullptr && zero_rows[j] == 0.f ? 0.f : inv[j];
    r_max = fmaxf(r_max, r);
    if (g != nullptr) gr_max = fmaxf(gr_max, fabsf(g[j]) * r);
  }
  __shared__ float scratch[2][kThreads / kWarpSize];
  r_max = block_max(r_max, scratch[0]);
  gr_max = block_max(gr_max, scratch[1]);
  if (threadIdx.x == 0) {
    out[0] = r_max;
    out[1] = gr_max;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) inv_norm_kernel(const T* x, int64_t rows, int64_t d, float* inv,
                                                            float* proj) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; row < rows;
       row += warps) {
    const T* xr = x + row * d;
    float ss = 0.f;
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const float v = load_elem(xr + k);
      ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      float r, radial;
      norm_factors(sqrtf(ss), r, radial);
      inv[row] = r;
      if (proj != nullptr) proj[row] = radial * radial;  // r^2, 0 for clamped rows: d r / d x = 0
    }
  }
}

// What one side of the pair contributes to dZ: its rows' incoming gradient and saved stats.
struct Role {
  const float* g;     // grad_rows by row
  const float* lse;   // the log-sum-exp its probabilities are relative to (InfoNCE, SupCon)
  const float* npos;  // SupCon: positives per row
  float weight;       // 1, or 1/2 for each half of symmetric InfoNCE
};

struct Anchor {
  float g, lse, inv_n;
  bool live;  // SupCon: the row has a positive
};

template <int kKind>
__device__ __forceinline__ Anchor anchor_of(const Role& r, int64_t i) {
  Anchor an{r.g[i], 0.f, 0.f, true};
  if constexpr (kKind != kSigLip) an.lse = r.lse[i];
  if constexpr (kKind == kSupCon) {
    const float n = r.npos[i];
    an.live = n > 0.f;
    an.inv_n = an.live ? 1.f / n : 0.f;
  }
  return an;
}

// d(total)/dz of the pair for the row `an` belongs to (contract: contrastive_bwd's formulas).
template <int kKind>
__device__ __forceinline__ float pair_grad(float z, bool self, bool pos, const Anchor& an) {
  if constexpr (kKind == kInfoNce) {
    return an.g * (exp_diff(z, an.lse) - (self ? 1.f : 0.f));
  } else if constexpr (kKind == kSupCon) {
    if (!an.live) return 0.f;
    const float p = self ? 0.f : exp_diff(z, an.lse);
    return an.g * (p - (pos ? an.inv_n : 0.f));
  } else {
    // -y g sigmoid(-y z) with one sigmoid and no branch around it (unrolled over a tile, branches kept
    // predicates alive across a spill); the sign flips are exact.
    const float flip = self ? -1.f : 1.f;
    return flip * an.g * sigmoid(flip * z);
  }
}

struct GradChunk {
  const float* sim;  // (rows, n) fp32
  int64_t row0, rows, n;
  const float* inv_own;
  const float* inv_other;
  const float* logit_scale;
  const float* logit_bias;
  const int64_t* labels;
  Role own, other;
  const float* proj_other;  // r_o^2 where the norm is not clamped, else 0 (with `normalize`)
  void* g_out;   // (rows, n) G = 2^e s dZ r_o in the inputs' dtype, or null (no product wanted)
  const float* bound;  // {max r_o, max |g_o| r_o} over the other side (weight_bound_kernel), with g_out
  float* unscale;      // (rows,) 2^-e of each row, with g_out
  float* ncoef;  // (rows,) r 2^-e sum_o G S as G is stored (the normalisation's backward), or null
  float* coef0;  // (B,) grad_coef[0] by global row, or null
  float* coef1;  // (B,) grad_coef[1]
};

template <typename T, int kKind, bool kNorm, bool kOwn, bool kOther>
__global__ void __launch_bounds__(kThreads) pair_grad_kernel(const GradChunk c) {
  const int64_t local = blockIdx.x, a = c.row0 + local;
  const float* srow = c.sim + local * c.n;
  T* grow = c.g_out != nullptr ? static_cast<T*>(c.g_out) + local * c.n : nullptr;
  const float s = *c.logit_scale, b = kKind == kSigLip ? *c.logit_bias : 0.f;
  const float ra = inv_norm_at<kNorm>(c.inv_own, a);
  const int64_t la = kKind == kSupCon ? c.labels[a] : 0;
  Anchor own{};
  if constexpr (kOwn) own = anchor_of<kKind>(c.own, a);
  int e = 0;  // the row's scaling of G
  if (grow != nullptr) {
    const float own_bound = kOwn ? c.own.weight * fabsf(own.g) * c.bound[0] : 0.f;
    const float other_bound = kOther ? c.other.weight * c.bound[1] : 0.f;
    e = weight_exponent(fabsf(s) * (own_bound + other_bound));
  }
  const float up = ldexpf(1.f, e);

  // sum of dZ c and of dZ for grad_coef (SupCon: the anchor role only, the entry's own gradient),
  // and of G S for the normalisation.
  float dz_c = 0.f, dz = 0.f, g_s = 0.f;
  struct Col {
    float sim, ro, rw;  // rw: r_o in G (weight_inv_norm)
    Anchor other;
    int64_t label;
  };
  auto load = [&](int64_t o) {
    const float ro = inv_norm_at<kNorm>(c.inv_other, o);
    Col v{srow[o], ro, weight_inv_norm<T, kNorm>(ro, c.proj_other, o), {}, kKind == kSupCon ? c.labels[o] : 0};
    if constexpr (kOther) v.other = anchor_of<kKind>(c.other, o);
    return v;
  };
  auto use = [&](int64_t o, const Col& v) {
    const float cc = pair_cos(v.sim, ra, v.ro);
    const float z = fmaf(s, cc, b);
    const bool self = o == a;
    const bool pos = kKind == kSupCon && !self && v.label == la;
    const float mine = kOwn ? c.own.weight * pair_grad<kKind>(z, self, pos, own) : 0.f;
    const float theirs = kOther ? c.other.weight * pair_grad<kKind>(z, self, pos, v.other) : 0.f;
    const float total = mine + theirs;
    const float entry = kKind == kSupCon ? mine : total;
    dz_c = fmaf(entry, cc, dz_c);
    dz += entry;
    if (grow != nullptr) g_s = fmaf(store_elem(grow + o, s * total * v.rw * up), v.sim, g_s);
  };
  stream_packets<kUnroll>(static_cast<int64_t>(threadIdx.x), c.n, static_cast<int64_t>(blockDim.x), load, use);

  __shared__ float scratch[3][kThreads / kWarpSize];
  dz_c = block_sum(dz_c, scratch[0]);
  dz = block_sum(dz, scratch[1]);
  g_s = block_sum(g_s, scratch[2]);
  if (threadIdx.x != 0) return;
  if (c.coef0 != nullptr) {
    c.coef0[a] = dz_c;
    c.coef1[a] = dz;
  }
  if (c.ncoef != nullptr) c.ncoef[local] = ra * ldexpf(g_s, -e);
  if (grow != nullptr) c.unscale[local] = ldexpf(1.f, -e);
}

struct FinishGrad {
  const float* acc;  // (rows, d) fp32: G @ y for the chunk
  const float* unscale;  // (rows,) 2^-e of each row of G
  int64_t row0, rows, d;
  const void* x;       // the side's input (global rows)
  const float* inv;    // r by global row
  const float* proj;   // r^2 where the norm is not clamped, else 0
  const float* ncoef;  // (rows,)
  void* out;           // the side's gradient (global rows)
};

// grad_x = r (u acc - coef r x) = r u acc - coef r^2 x with u = 2^-e; without `normalize`, u acc.
template <typename T, bool kNorm>
__global__ void __launch_bounds__(kThreads) finish_grad_kernel(const FinishGrad f) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const T* x = static_cast<const T*>(f.x);
  T* out = static_cast<T*>(f.out);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; row < f.rows;
       row += warps) {
    const int64_t a = f.row0 + row;
    const float* acc = f.acc + row * f.d;
    const float ra = kNorm ? f.inv[a] : 1.f;
    const float along = kNorm ? f.ncoef[row] * f.proj[a] : 0.f;
    const float u = f.unscale[row];
    for (int64_t k = lane; k < f.d; k += kWarpSize) {
      const float sum = acc[k] * u;  // exact: a power of two
      const float v = kNorm ? fmaf(ra, sum, -along * load_elem(x + a * f.d + k)) : sum;
      store_elem(out + a * f.d + k, v);
    }
  }
}

// ---- the forward: similarity tiles on chip (tile_product, csrc/tiles.cuh) ----
//
// tile_stats_kernel: a block of 4 warps owns 64 rows of its own side (16 per warp) and sweeps the
// other side in tiles of 64 rows. Per tile, both sides' rows are staged through shared memory 64
// bf16/fp16 or 32 fp32 features at a time (zero beyond D and beyond the last row, so any D runs the
// same k steps) and each warp forms its 16 x 64 block of S with 8 m16n8k16 products per k step (fp32:
// 8 x 3 m16n8k8 tf32), in fp32 registers. The tile then folds into the lane's two rows (g and g + 8
// of the warp's 16) with the row kernel's arithmetic: the online (max, sum-exp) without +inf logits,
// the diagonal, SupCon's positives and SigLIP's softplus sums. At the end the 4 lanes of a row merge
// in a fixed order; no similarity is written to device memory, and nothing is accumulated across
// blocks (no atomics).
// Symmetric InfoNCE: blocks past `first_blocks` take the column role (own = key, other = query, the
// same products in the same order, so S^T's entries are S's), and write the column lse and the
// column loss, which finish_symmetric_tiles_kernel averages with the row loss.

constexpr int kTileWarps = 4;
constexpr int kTileThreads = kTileWarps * kWarpSize;
constexpr int kTileRows = 16 * kTileWarps;  // own rows per block
static_assert(kTileRows == kTileCols, "one staging routine serves both sides");

using StagedRows = Staged<kTileRows>;

// One role of the tiled forward: the rows whose statistics its blocks compute (own) against the rows
// of the other side.
struct TilePass {
  const void* own;
  const void* other;
  int64_t n_own, n_other;
  const float* inv_own;  // null without `normalize`
  const float* inv_other;
  float* loss;   // (n_own,) the row's loss (the column loss in the column role)
  float* lse;    // (n_own,) stats[0] (stats[1], the column lse, in the column role)
  float* npos;   // SupCon: stats[1]
};

struct TileFwd {
  TilePass pass[2];      // rows, and (symmetric InfoNCE) columns: own is the key side there, and
                         // c = S r_other r_own keeps the row role's order of the products
  int64_t first_blocks;  // blocks of pass[0]
  int64_t d;
  const float* logit_scale;
  const float* logit_bias;
  const int64_t* labels;  // SupCon
  bool vec;               // 16-byte loads: d % 8 == 0 and both inputs 16-byte aligned
};

// softplus(v) with the same value (max(v, 0) adds an exact 0 or v) but no branch around the two
// transcendental paths: 16 of them unrolled per tile kept predicates alive across a spill on sm_80.
// NaN passes (fmaxf drops it, -|v| keeps it), +-inf give inf and 0.
__device__ __forceinline__ float softplus_select(float v) { return fmaxf(v, 0.f) + log1pf(expf(-fabsf(v))); }

// The statistics of one own row, kept by each of the 4 lanes that hold its columns.
struct TileRow {
  Acc acc;
  bool pos_inf;  // a +inf logit, left out of acc
  float sum;     // SupCon: positives' logits; SigLIP: softplus sum
  float npos;    // SupCon
  float diag;    // InfoNCE: z_aa, in the one lane that holds it (0 in the others)
};

template <int kKind>
__device__ __forceinline__ void fold_tile(TileRow& st, const float (&acc)[8][4], int half, int64_t a, float ra,
                                          int64_t la, int64_t j0, const TilePass& p, bool columns, float s, float b,
                                          const float* s_ro, const int64_t* s_label) {
  const int t = threadIdx.x % 4;
  float y[8];  // two packets of 8 logits (accumulate<8> stays in registers; at 16 its tree sum did not)
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int local = n * 8 + 2 * t + e;
      const int64_t j = j0 + local;
      const bool valid = j < p.n_other, self = j == a;
      const float sim = acc[n][2 * half + e], ro = s_ro[local];
      const float z = fmaf(s, columns ? pair_cos(sim, ro, ra) : pair_cos(sim, ra, ro), b);
      // Columns past the other side's rows (and SupCon's self) as a -inf logit: selects, not branches
      // (softplus(-inf) and exp(-inf - m) add exact zeros).
      const float zv = valid ? z : -INFINITY;
      if constexpr (kKind == kSigLip) {
        st.sum += softplus_select(self ? -zv : zv);
      } else {
        if (kKind == kInfoNce && self) st.diag = z;
        y[(2 * n + e) % 8] = finite_top(kKind == kSupCon && self ? -INFINITY : zv, st.pos_inf);
        if (kKind == kSupCon && valid && !self && s_label[local] == la) {
          st.npos += 1.f;
          st.sum += z;
        }
      }
    }
    if (kKind != kSigLip && n % 4 == 3) accumulate<8, false, false, false>(st.acc, y, nullptr, nullptr, -1, 0.f, 0.f, 0.f);
  }
}

// The 4 lanes of a row (lane = 4 g + t) merge their statistics, xor 1 then xor 2: a fixed order.
template <int kKind>
__device__ __forceinline__ void merge_row_lanes(TileRow& st) {
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    if constexpr (kKind != kSigLip) {
      const float m = __shfl_xor_sync(0xffffffffu, st.acc.m, off);
      const float sm = __shfl_xor_sync(0xffffffffu, st.acc.s, off);
      merge(st.acc, m, sm, 0.f, 0.f);
      st.pos_inf = (__shfl_xor_sync(0xffffffffu, st.pos_inf ? 1 : 0, off) != 0) || st.pos_inf;
    }
    if constexpr (kKind == kInfoNce) st.diag += __shfl_xor_sync(0xffffffffu, st.diag, off);
    if constexpr (kKind != kInfoNce) st.sum += __shfl_xor_sync(0xffffffffu, st.sum, off);
    if constexpr (kKind == kSupCon) st.npos += __shfl_xor_sync(0xffffffffu, st.npos, off);
  }
}

// The row's outputs, as row_stats_kernel writes them.
template <int kKind>
__device__ __forceinline__ void write_row(const TileRow& st, int64_t a, const TilePass& p) {
  if constexpr (kKind == kInfoNce) {
    const float lse = lse_of(st.acc.m, st.acc.s, st.pos_inf);
    p.lse[a] = lse;
    p.loss[a] = lse - st.diag;
  } else if constexpr (kKind == kSupCon) {
    const bool live = st.npos > 0.f;
    const float lse = live ? lse_of(st.acc.m, st.acc.s, st.pos_inf) : 0.f;
    p.lse[a] = lse;
    p.npos[a] = st.npos;
    p.loss[a] = live ? lse - st.sum / st.npos : 0.f;
  } else {
    p.loss[a] = st.sum;
  }
}

// The block's role, field by field (a select of the whole struct went through local memory).
__device__ __forceinline__ TilePass pick_pass(const TileFwd& f, bool second) {
  const TilePass &r = f.pass[0], &c = f.pass[1];
  return TilePass{second ? c.own : r.own,         second ? c.other : r.other,
                  second ? c.n_own : r.n_own,     second ? c.n_other : r.n_other,
                  second ? c.inv_own : r.inv_own, second ? c.inv_other : r.inv_other,
                  second ? c.loss : r.loss,       second ? c.lse : r.lse,
                  second ? c.npos : r.npos};
}

// fp32 asks for 1 block per SM: with the default bounds ptxas chose 72-133 registers and spilled in
// SupCon and SigLIP with `normalize`, and at 3 blocks (170 registers) spilled in all six; at 1 it takes
// 179-215 and spills none. bf16/fp16 keep the default (0: no minimum).
template <typename T>
constexpr int kTileStatsMinBlocks = mma::kPerWord<T> == 1 ? 1 : 0;

template <typename T, int kKind, bool kNorm>
__global__ void __launch_bounds__(kTileThreads, kTileStatsMinBlocks<T>) tile_stats_kernel(const TileFwd f) {
  const bool second = blockIdx.x >= f.first_blocks;
  const TilePass p = pick_pass(f, second);
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) - (second ? f.first_blocks : 0)) * kTileRows;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const float s = *f.logit_scale, b = kKind == kSigLip ? *f.logit_bias : 0.f;
  const T* own = static_cast<const T*>(p.own);
  const T* other = static_cast<const T*>(p.other);

  __shared__ StagedRows s_own, s_other;
  __shared__ float s_ro[kTileCols];
  __shared__ int64_t s_label[kTileCols];

  TileRow st[2];
  int64_t a[2], la[2];
  float ra[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st[h] = {acc_init(), false, 0.f, 0.f, 0.f};
    a[h] = row0 + warp * 16 + lane / 4 + 8 * h;
    const bool valid = a[h] < p.n_own;
    ra[h] = valid ? inv_norm_at<kNorm>(p.inv_own, a[h]) : 1.f;
    la[h] = kKind == kSupCon && valid ? f.labels[a[h]] : 0;
  }

  const TileOperands<T> op{own, other, row0, p.n_own, p.n_other, f.d, f.vec};
  for (int64_t j0 = 0; j0 < p.n_other; j0 += kTileCols) {
    float acc[8][4] = {};
    tile_product<T, kTileRows>(acc, &s_own[0][0], kTileStride, s_other, op, j0, warp * 16, 0, lane, [&] {
      if (threadIdx.x < kTileCols) {
        const int64_t j = j0 + threadIdx.x;
        s_ro[threadIdx.x] = j < p.n_other ? inv_norm_at<kNorm>(p.inv_other, j) : 1.f;
        if constexpr (kKind == kSupCon) s_label[threadIdx.x] = j < p.n_other ? f.labels[j] : 0;
      }
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) fold_tile<kKind>(st[h], acc, h, a[h], ra[h], la[h], j0, p, second, s, b, s_ro, s_label);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    merge_row_lanes<kKind>(st[h]);
    if (lane % 4 == 0 && a[h] < p.n_own) write_row<kKind>(st[h], a[h], p);
  }
}

// loss_i = (row loss + column loss) / 2 once both roles of the tiled forward are done.
__global__ void __launch_bounds__(kThreads) finish_symmetric_tiles_kernel(int64_t b, const float* col_loss,
                                                                           float* loss) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < b) loss[i] = 0.5f * (loss[i] + col_loss[i]);
}


// ---- the backward: similarity tiles on chip (tensor-core products; fp32 as three tf32 products) ----
//
// tile_grad_kernel: a block of 8 warps owns kGradRows (32) rows of its own side and sweeps the other side
// in tiles of 64 rows, two products per tile, no similarity or weight in device memory:
//   1. S (kGradRows x 64) = own . other^T over the full width, staged 64 features at a time as in the
//      forward (the same k steps in the same order, so each S entry is the forward's); the warps split
//      the tile's columns.
//   2. Each lane turns its S entries into the row's pair weights W = s dZ_ij r'_j (pair_grad_kernel's
//      arithmetic) and the row sums for grad_coef, and writes W, rounded to the inputs' dtype (fp16:
//      times the row's running power of two, scale_row_weights), to shared memory in the A-operand
//      layout: the fp32 C fragments of two adjacent 8-column tiles are one 16-wide k step of A (fp32
//      inputs: W kept in fp32, one word per column, eight 8-wide k steps).
//   3. acc (kGradRows x D, fp32, in shared memory) += W . other: the other tile is staged again 64
//      features at a time as it is (exact), transposed (pairs of other rows per feature, fp32 one row
//      per word: the B operand), and each warp takes 8 of each 64 features for all of the block's rows.
// The normalisation's radial sum r_i sum_j W_ij S_ij takes each W_ij as the product holds it, so that
// grad = r (acc - (acc . x^) x^) is formed from one value of each weight: with the fp32 W there (and the
// other rows staged times r' and rounded), nearly identical rows lost their small tangential gradient
// to the difference (29 % of a bf16 row at cos ~1). A clamped fp16 row is all zeros (no nonzero fp16
// row has a norm below 1e-12): its weight is 0, so that its r' = 1e12 stays out of the row maxima.
// At the end the row sums merge in a fixed order (lanes, then warps), grad_coef is written, and
// grad = r (u acc - u (sum_j W S) r^2 x) (u acc without `normalize`, u = 2^-shift) goes out in the
// inputs' dtype.
// Nothing is accumulated across blocks (no atomics). The column role (own = key rows, other = query
// rows, for grad_key) is the same kernel on S^T with c in the forward's product order.

constexpr int kGradRowTiles = 2;                          // 16-row tiles per block
constexpr int kGradRows = 16 * kGradRowTiles;             // own rows per block
constexpr int kGradWarps = 8;  // twice the forward's: the accumulator's shared memory allows 1-2 blocks per SM
constexpr int kGradThreads = kGradWarps * kWarpSize;
constexpr int kGradWarpsPerRowTile = kGradWarps / kGradRowTiles;
constexpr int kGradSimTiles = kTileCols / 8 / kGradWarpsPerRowTile;  // 8-column S tiles per warp
constexpr int kGradWarpFeatures = kTileK / kGradWarps;    // features of each staged chunk per warp
constexpr int kGradAccPad = 8;                            // floats past each accumulator row (banks)
static_assert(kGradWarps % kGradRowTiles == 0 && kGradSimTiles >= 1 && kGradWarpFeatures % 8 == 0 &&
                  kGradThreads >= kTileCols && kGradThreads >= kGradRows,
              "the warp split of the tiles");

// One role of the tiled backward.
struct TileGrad {
  const void* own;
  const void* other;
  int64_t n_own, n_other, d;
  const float* inv_own;  // null without `normalize`
  const float* inv_other;
  const float* proj_own;  // r^2 where the norm is not clamped, else 0
  const float* logit_scale;
  const float* logit_bias;
  const int64_t* labels;  // SupCon
  Role own_role, other_role;
  const float* proj_other;  // r^2 where the norm is not clamped, else 0 (with `normalize`)
  void* out;           // the own side's gradient, or null
  float* coef0;        // grad_coef rows by own row, or null
  float* coef1;
  int acc_stride;  // floats per row of the shared accumulator
  bool columns;    // own is the key side: c = S r_other r_own, the forward's order
  bool vec;        // 16-byte loads: rows a multiple of 16 bytes and both inputs 16-byte aligned
};

// The other tile's buffer: its rows for S (StagedRows), then its kTileK features transposed.
template <typename T>
constexpr int kOtherWords = kTileCols * kTileStride > kTileK * kAcrossStride<T> ? kTileCols * kTileStride
                                                                                 : kTileK * kAcrossStride<T>;

// tile_grad_kernel's static shared memory.
constexpr int64_t grad_static_smem(int per_word) {
  const int64_t across = kTileCols / per_word + 4;
  const int64_t other = kTileCols * kTileStride > kTileK * across ? kTileCols * kTileStride : kTileK * across;
  return static_cast<int64_t>(sizeof(uint32_t)) * (kGradRows * kTileStride + other + kGradRows * across) +
         kTileCols * (2 * sizeof(float) + sizeof(int64_t) + sizeof(Anchor)) +
         kGradRows * sizeof(float) * (1 + 3 * kGradWarpsPerRowTile);
}

// The shared accumulator's bytes (dynamic shared memory) for width d.
inline int64_t grad_acc_stride(int64_t d) { return (d + 15) / 16 * 16 + kGradAccPad; }
inline int64_t grad_acc_bytes(int64_t d) {
  return kGradRows * grad_acc_stride(d) * static_cast<int64_t>(sizeof(float));
}

// Rows [row0, row0 + 64) x features [k0, k0 + kTileK) of x (rows x d) into dst transposed: dst[f][p]
// holds rows 2p (low half) and 2p + 1 at feature k0 + f (fp32: row p), the B operand of W . x; zero
// outside x. `dst` has kAcrossStride<T> words per feature.
template <typename T>
__device__ __forceinline__ void stage_columns(uint32_t (*dst)[kAcrossStride<T>], const T* x, int64_t row0,
                                              int64_t rows, int64_t d, int64_t k0, bool vec) {
  using Raw = typename Elem<T>::Raw;
  const Raw* raw = reinterpret_cast<const Raw*>(x);
  if constexpr (mma::kPerWord<T> == 1) {
    if (vec) {  // one thread per 4 features of a row; consecutive threads: consecutive rows
      for (int i = threadIdx.x; i < kTileCols * (kTileK / 4); i += blockDim.x) {
        const int r = i % kTileCols, q = i / kTileCols;
        const int64_t row = row0 + r, k = k0 + 4 * q;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (k < d && row < rows) v = ld_keep(raw + row * d + k);
        dst[4 * q][r] = v.x, dst[4 * q + 1][r] = v.y, dst[4 * q + 2][r] = v.z, dst[4 * q + 3][r] = v.w;
      }
    } else {
      for (int i = threadIdx.x; i < kTileK * kTileCols; i += blockDim.x) {
        const int r = i % kTileCols, f = i / kTileCols;
        const int64_t row = row0 + r, k = k0 + f;
        dst[f][r] = k < d && row < rows ? __float_as_uint(raw[row * d + k]) : 0u;
      }
    }
  } else if (vec) {
    constexpr int kPackets = kTileK / 8;
    for (int i = threadIdx.x; i < kTileWords * kPackets; i += blockDim.x) {
      const int p = i % kTileWords, q = i / kTileWords;  // consecutive threads: consecutive words of a row
      const int64_t row = row0 + 2 * p, k = k0 + 8 * q;
      uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
      if (k < d && row < rows) lo = ld_keep(raw + row * d + k);
      if (k < d && row + 1 < rows) hi = ld_keep(raw + (row + 1) * d + k);
      const uint32_t a[4] = {lo.x, lo.y, lo.z, lo.w}, b[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dst[8 * q + 2 * e][p] = (a[e] & 0xffffu) | (b[e] << 16);
        dst[8 * q + 2 * e + 1][p] = (a[e] >> 16) | (b[e] & 0xffff0000u);
      }
    }
  } else {
    for (int i = threadIdx.x; i < kTileK * kTileWords; i += blockDim.x) {
      const int p = i % kTileWords, f = i / kTileWords;
      const int64_t row = row0 + 2 * p, k = k0 + f;
      uint32_t lo = 0, hi = 0;
      if (k < d) {
        if (row < rows) lo = raw[row * d + k];
        if (row + 1 < rows) hi = raw[(row + 1) * d + k];
      }
      dst[f][p] = lo | (hi << 16);
    }
  }
}

// A row of the block as one lane sees it (rows g and g + 8 of the warp's 16-row tile).
struct GradRow {
  int64_t a;  // own row index
  bool valid;
  float ra;
  int64_t label;
  Anchor mine;  // the own role's anchor (kOwn)
};

template <int kKind, bool kNorm, bool kOwn>
__device__ __forceinline__ GradRow grad_row(const TileGrad& f, int64_t a) {
  GradRow r{a, a < f.n_own, 1.f, 0, Anchor{0.f, 0.f, 0.f, false}};
  if (!r.valid) return r;
  r.ra = inv_norm_at<kNorm>(f.inv_own, a);
  if constexpr (kKind == kSupCon) r.label = f.labels[a];
  if constexpr (kOwn) r.mine = anchor_of<kKind>(f.own_role, a);
  return r;
}

// The minimum of one block per SM in the launch bounds: without it ptxas capped an InfoNCE column
// instantiation at 64 registers and spilled on sm_90.
template <typename T, int kKind, bool kNorm, bool kOwn, bool kOther>
__global__ void __launch_bounds__(kGradThreads, 1) tile_grad_kernel(const TileGrad f) {
  constexpr bool kScaled = std::is_same<T, c10::Half>::value;  // W's running row scale (bf16: fp32's range)
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int tile = warp / kGradWarpsPerRowTile;                                 // the warp's S rows
  const int col0 = (warp % kGradWarpsPerRowTile) * kGradSimTiles * 8;          // and S columns
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kGradRows;
  const float s = *f.logit_scale, b = kKind == kSigLip ? *f.logit_bias : 0.f;
  const T* own = static_cast<const T*>(f.own);
  const T* other = static_cast<const T*>(f.other);
  const bool has_out = f.out != nullptr;

  constexpr int kAcross = kAcrossStride<T>;
  constexpr int kWSteps = kTileCols / mma::kStepK<T>;  // k steps of W . other over the tile's rows
  __shared__ Staged<kGradRows> s_own;
  // the other tile's chunk: rows for S, then transposed for W . other
  __shared__ uint32_t s_other_words[kOtherWords<T>];
  StagedRows& s_other = *reinterpret_cast<StagedRows*>(s_other_words);
  auto* const s_cols = reinterpret_cast<uint32_t (*)[kAcross]>(s_other_words);
  __shared__ uint32_t s_w[kGradRows][kAcross];  // the tile's W as A fragments: kGradRows x 64 other rows
  __shared__ float s_ro[kTileCols];
  __shared__ float s_rw[kTileCols];  // r'_j in W (weight_inv_norm)
  __shared__ int64_t s_label[kTileCols];
  __shared__ Anchor s_anchor[kTileCols];  // the other role's anchors (kOther)
  __shared__ float s_unscale[kGradRows];
  __shared__ float s_sums[3][kGradWarpsPerRowTile][kGradRows];
  LOSSFORGE_DYNAMIC_SMEM(float, grad_acc);  // kGradRows x acc_stride

  GradRow rows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) rows[h] = grad_row<kKind, kNorm, kOwn>(f, row0 + tile * 16 + g + 8 * h);
  if (has_out) {
    for (int i = threadIdx.x; i < kGradRows * f.acc_stride; i += blockDim.x) grad_acc[i] = 0.f;
  }
  // sum_j dZ c and sum_j dZ (grad_coef; SupCon: the anchor role only), sum_j W S (normalisation, W as
  // the product holds it)
  float dz_c[2] = {0.f, 0.f}, dz[2] = {0.f, 0.f}, w_s[2] = {0.f, 0.f};
  int shift[kGradRowTiles][2];  // fp16: every row tile's rows g, g + 8 (the warp accumulates them all)
#pragma unroll
  for (int i = 0; i < kGradRowTiles; ++i) shift[i][0] = shift[i][1] = kScaled ? 126 : 0;

  const TileOperands<T> op{own, other, row0, f.n_own, f.n_other, f.d, f.vec};
  for (int64_t j0 = 0; j0 < f.n_other; j0 += kTileCols) {
    float sim[kGradSimTiles][4] = {};
    tile_product<T, kGradRows>(sim, &s_own[0][0], kTileStride, s_other, op, j0, tile * 16, col0, lane, [&] {
      if (threadIdx.x < kTileCols) {
        const int64_t j = j0 + threadIdx.x;
        const bool in = j < f.n_other;
        s_ro[threadIdx.x] = in ? inv_norm_at<kNorm>(f.inv_other, j) : 1.f;
        s_rw[threadIdx.x] = in ? weight_inv_norm<T, kNorm>(s_ro[threadIdx.x], f.proj_other, j) : 1.f;
        if constexpr (kKind == kSupCon) s_label[threadIdx.x] = in ? f.labels[j] : 0;
        if constexpr (kOther) {
          s_anchor[threadIdx.x] = in ? anchor_of<kKind>(f.other_role, j) : Anchor{0.f, 0.f, 0.f, false};
        }
      }
    });

    // The lane's entries: rows g, g + 8 (h), columns col0 + 8 n + 2 t + e.
    float w[kGradSimTiles][2][2];
#pragma unroll
    for (int n = 0; n < kGradSimTiles; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const GradRow& r = rows[h];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int local = col0 + n * 8 + 2 * t + e;
          const int64_t j = j0 + local;
          const bool valid = r.valid && j < f.n_other, self = j == r.a;
          const bool pos = kKind == kSupCon && !self && s_label[local] == r.label;
          const float ro = s_ro[local];
          const float sv = sim[n][2 * h + e];
          const float cc = f.columns ? pair_cos(sv, ro, r.ra) : pair_cos(sv, r.ra, ro);
          const float z = fmaf(s, cc, b);
          const float mine = kOwn ? f.own_role.weight * pair_grad<kKind>(z, self, pos, r.mine) : 0.f;
          const float theirs = kOther ? f.other_role.weight * pair_grad<kKind>(z, self, pos, s_anchor[local]) : 0.f;
          // Entries past either side add exact zeros (their S may be NaN: a zero row times inf).
          const float total = valid ? mine + theirs : 0.f;
          const float entry = kKind == kSupCon ? (valid ? mine : 0.f) : total;
          const float cv = valid ? cc : 0.f;
          dz_c[h] = fmaf(entry, cv, dz_c[h]);
          dz[h] += entry;
          w[n][h][e] = s * total * s_rw[local];
          sim[n][2 * h + e] = valid ? sv : 0.f;  // (the radial sum's S)
        }
      }
    }
    if (!has_out) continue;  // the same for the whole block

    float rescale[kGradRowTiles][2];
#pragma unroll
    for (int i = 0; i < kGradRowTiles; ++i) rescale[i][0] = rescale[i][1] = 1.f;
    if constexpr (kScaled) {
      scale_row_weights<kGradSimTiles, kGradRows, kGradWarpsPerRowTile, kGradRowTiles>(
          w, shift, rescale, &s_sums[0][0][0], tile, 0, warp % kGradWarpsPerRowTile, lane);
    }
#pragma unroll
    for (int n = 0; n < kGradSimTiles; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float down = kScaled ? ldexpf(1.f, -shift_of(shift, tile, h)) : 1.f;  // this tile's scale, undone
        float held[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          held[e] = as_stored<T>(w[n][h][e]);
          if constexpr (kNorm) w_s[h] = fmaf(held[e] * down, sim[n][2 * h + e], w_s[h]);
        }
        store_pair<T>(s_w[tile * 16 + g + 8 * h], col0 + n * 8 + 2 * t, held[0], held[1]);
      }
    }

    __syncthreads();  // W is complete; every warp is done with the staged rows
    // W's A fragments: held for the whole tile for half inputs; fp32's (twice the k steps, each split
    // three ways in mma_step) are loaded again per feature chunk, or ptxas spills them.
    constexpr bool kHoldW = mma::kPerWord<T> == 2;
    uint32_t wa[kGradRowTiles][kWSteps][4];
    auto load_w = [&](int rt) {
#pragma unroll
      for (int ks = 0; ks < kWSteps; ++ks) mma::load_a(wa[rt][ks], &s_w[rt * 16][ks * 8], kAcross, lane);
    };
    if constexpr (kHoldW) {
#pragma unroll
      for (int rt = 0; rt < kGradRowTiles; ++rt) load_w(rt);
    }
    for (int64_t c0 = 0; c0 < f.d; c0 += kTileK) {
      if (c0 > 0) __syncthreads();  // the previous chunk's fragment loads are done
      stage_columns<T>(s_cols, other, j0, f.n_other, f.d, c0, f.vec);
      __syncthreads();
      const int64_t f0 = c0 + warp * kGradWarpFeatures;
      if (f0 >= f.d) continue;
#pragma unroll
      for (int rt = 0; rt < kGradRowTiles; ++rt) {
        if constexpr (!kHoldW) load_w(rt);
#pragma unroll
        for (int n = 0; n < kGradWarpFeatures / 8; ++n) {
          accumulate_rows<T>(grad_acc, f.acc_stride, rt * 16, f0 + n * 8, wa[rt], lane,
                             [&](uint32_t (&fb)[2], int ks) {
            mma::load_b(fb, &s_cols[warp * kGradWarpFeatures + n * 8][ks * 8], kAcross, lane);
          }, rescale[rt][0], rescale[rt][1]);
        }
      }
    }
  }

  // The row sums: the 4 lanes of a row (xor 1, then 2), then the row tile's warps in order.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      dz_c[h] += __shfl_xor_sync(0xffffffffu, dz_c[h], off);
      dz[h] += __shfl_xor_sync(0xffffffffu, dz[h], off);
      w_s[h] += __shfl_xor_sync(0xffffffffu, w_s[h], off);
    }
    if (t == 0) {
      const int local = tile * 16 + g + 8 * h, part = warp % kGradWarpsPerRowTile;
      s_sums[0][part][local] = dz_c[h];
      s_sums[1][part][local] = dz[h];
      s_sums[2][part][local] = w_s[h];
      if (part == 0) s_unscale[local] = ldexpf(1.f, -shift_of(shift, tile, h));  // (every warp's is the same)
    }
  }
  __syncthreads();
  if (threadIdx.x < kGradRows) {
    const int local = threadIdx.x;
    const int64_t a = row0 + local;
    float sums[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      for (int part = 0; part < kGradWarpsPerRowTile; ++part) sums[q] += s_sums[q][part][local];
    }
    if (f.coef0 != nullptr && a < f.n_own) {
      f.coef0[a] = sums[0];
      f.coef1[a] = sums[1];
    }
    // the normalisation's coefficient acc . x^ = r sum_j W S
    s_sums[2][0][local] = a < f.n_own ? inv_norm_at<kNorm>(f.inv_own, a) * sums[2] : 0.f;
  }
  if (!has_out) return;
  __syncthreads();

  // grad = r (u acc - coef r x) = r u acc - coef r^2 x with u = 2^-shift; without `normalize`, u acc.
  T* out = static_cast<T*>(f.out);
  const int64_t rows_here = min(static_cast<int64_t>(kGradRows), f.n_own - row0);
  for (int64_t i = threadIdx.x; i < rows_here * f.d; i += blockDim.x) {
    const int local = static_cast<int>(i / f.d);
    const int64_t k = i - local * f.d, a = row0 + local;
    const float sum = grad_acc[local * f.acc_stride + k] * s_unscale[local];  // exact: a power of two
    if constexpr (kNorm) {
      const float along = s_sums[2][0][local] * f.proj_own[a];
      store_elem(out + a * f.d + k, fmaf(f.inv_own[a], sum, -along * load_elem(own + a * f.d + k)));
    } else {
      store_elem(out + a * f.d + k, sum);
    }
  }
}

}  // namespace contrastive
}  // namespace lossforge

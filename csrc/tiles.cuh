// Similarity tiles on the tensor cores, shared by the kernels that never write their B x M products:
// the contrastive forward and backward (contrastive.cuh) and batch-hard mining (triplet.cuh).
//
// A block stages one tile of the other side's rows through shared memory, kSlabK<T> features at a
// time, as 32-bit operand words (element pairs, or one fp32 element each; zero beyond the width and
// beyond the last row, so any width runs the same k steps), and its own rows either with each slab or
// once for the whole sweep (resident: half the loads, at 128 bytes of shared memory per bf16/fp16
// feature for 64 rows, 256 per fp32 feature); each warp multiplies its 16 own rows
// by 8-row groups of the tile with mma.sync (csrc/mma.cuh's mma_step) into fp32 fragments. Every
// kernel walks the k steps in the same order, so an entry is the same float wherever it is formed
// (the contrastive backward relies on seeing the forward's logits).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "mma.cuh"

namespace lossforge {

constexpr int kTileCols = 64;  // other rows per tile
constexpr int kTileWords = 32;  // 32-bit operand words of a staged row
template <typename T>
constexpr int kSlabK = kTileWords * mma::kPerWord<T>;  // features staged at a time
constexpr int kTileK = kSlabK<c10::BFloat16>;  // 64: a half slab; the contrastive backward's chunks
// Words per staged row: +4 puts the 8 rows one fragment load reads on different banks.
constexpr int kTileStride = kTileWords + 4;

template <int kRows>
using Staged = uint32_t[kRows][kTileStride];
// Words per row of a tile's 64 rows as operand words along the rows (weights as A fragments over the
// tile's rows; a tile transposed, one row per feature), +4 for the banks as kTileStride.
template <typename T>
constexpr int kAcrossStride = kTileCols / mma::kPerWord<T> + 4;
using StagedTile = Staged<kTileCols>;

constexpr int kWeightTopExp = 14;  // a row's scaled weights (half A operands) stay below 2^14

// e with bound 2^e in [2^13, 2^14): a row's scaling of its weights before they are rounded to fp16 A
// operands (the fp32 product is scaled back exactly). 0 where the bound is 0 (nothing to rescale) or not
// finite (inf and NaN weights pass as they are); |e| <= 126 so that 2^e and 2^-e are normal floats.
__device__ __forceinline__ int weight_exponent(float bound) {
  if (!(bound > 0.f) || isinf(bound)) return 0;
  int x;
  frexpf(bound, &x);  // bound < 2^x
  return max(-126, min(126, kWeightTopExp - x));
}

// Rows [row0, row0 + n_rows) x features [k0, k0 + kSlabK<T>) of x (rows x d) into dst (`stride` words
// per row) as operand words, zero outside x.
template <typename T>
__device__ __forceinline__ void stage_slab(uint32_t* dst, int stride, int n_rows, const T* x, int64_t row0,
                                           int64_t rows, int64_t d, int64_t k0, bool vec) {
  using Raw = typename Elem<T>::Raw;
  constexpr int kPer = mma::kPerWord<T>;
  const Raw* raw = reinterpret_cast<const Raw*>(x);
  if (vec) {  // k0 and d multiples of a 16-byte packet: a packet is wholly inside x's row or wholly outside
    constexpr int kPackets = kTileWords / 4;
    for (int i = threadIdx.x; i < n_rows * kPackets; i += blockDim.x) {
      const int r = i / kPackets, q = i % kPackets;
      const int64_t row = row0 + r, k = k0 + 4 * kPer * q;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && k < d) v = ld_keep(raw + row * d + k);
      uint32_t* w = dst + r * stride + 4 * q;
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    }
  } else {
    for (int i = threadIdx.x; i < n_rows * kTileWords; i += blockDim.x) {
      const int r = i / kTileWords, p = i % kTileWords;
      const int64_t row = row0 + r, k = k0 + kPer * p;
      uint32_t word = 0;
      if constexpr (kPer == 2) {
        uint32_t lo = 0, hi = 0;
        if (row < rows) {
          if (k < d) lo = raw[row * d + k];
          if (k + 1 < d) hi = raw[row * d + k + 1];
        }
        word = lo | (hi << 16);
      } else {
        if (row < rows && k < d) word = __float_as_uint(raw[row * d + k]);
      }
      dst[r * stride + p] = word;
    }
  }
}

template <typename T, int kRows = kTileCols>
__device__ __forceinline__ void stage_rows(Staged<kRows>& dst, const T* x, int64_t row0, int64_t rows, int64_t d,
                                           int64_t k0, bool vec) {
  stage_slab<T>(&dst[0][0], kTileStride, kRows, x, row0, rows, d, k0, vec);
}

// Words per row of own rows staged once for the whole sweep (every slab of the width side by side, at
// least one, which a width of 0 stages as zeros; the +4 keeps fragment loads on different banks, as
// kTileStride does).
__host__ __device__ constexpr int64_t resident_stride(int64_t d, int per_word) {
  const int64_t slab = kTileWords * per_word;
  return (d > slab ? (d + slab - 1) / slab : 1) * kTileWords + 4;
}
template <typename T>
__host__ __device__ constexpr int64_t resident_stride(int64_t d) {
  return resident_stride(d, mma::kPerWord<T>);
}

// What a block multiplies: its own rows [row0, row0 + its rows) against the other side's rows.
template <typename T>
struct TileOperands {
  const T* own;
  const T* other;
  int64_t row0, n_own, n_other, d;
  bool vec;  // 16-byte loads: d elements a multiple of 16 bytes and both sides 16-byte aligned
};

// Own rows staged once (kResident: s_own holds kOwnRows rows of resident_stride(d) words).
template <typename T, int kOwnRows>
__device__ __forceinline__ void stage_resident(uint32_t* s_own, const TileOperands<T>& op) {
  const int stride = static_cast<int>(resident_stride<T>(op.d));
  for (int64_t k0 = 0; k0 < op.d || k0 == 0; k0 += kSlabK<T>) {
    const int64_t word0 = k0 / mma::kPerWord<T>;
    stage_slab<T>(s_own + word0, stride, kOwnRows, op.own, op.row0, op.n_own, op.d, k0, op.vec);
  }
}

// Two values rounded to T as one 32-bit operand word (the lower k in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  return static_cast<uint32_t>(Elem<T>::store(lo)) | (static_cast<uint32_t>(Elem<T>::store(hi)) << 16);
}

// Two values of an even column pair into a row of operand words (`row` holds the row's first word):
// one word rounded to T for bf16/fp16, two fp32 words.
template <typename T>
__device__ __forceinline__ void store_pair(uint32_t* row, int col, float lo, float hi) {
  if constexpr (mma::kPerWord<T> == 2) {
    row[col / 2] = pack_pair<T>(lo, hi);
  } else {
    row[col] = __float_as_uint(lo), row[col + 1] = __float_as_uint(hi);
  }
}

// B's fragment of W . R for rows R staged as operand words along the features (stage_slab's layout):
// k runs over the rows r0 .. r0 + kStepK<T>, the 8 columns over the features f0 .. f0 + 8 (f0 even).
// bf16/fp16: each word pairs two rows' halves (k 2t, 2t + 1 and 2t + 8, 2t + 9); fp32: rows r0 + t and
// r0 + t + 4, as load_a reads the weights' words t and t + 4.
template <typename T>
__device__ __forceinline__ void load_b_across_rows(uint32_t (&b)[2], const uint32_t* rows, int stride, int r0,
                                                   int f0, int lane) {
  const int f = f0 + lane / 4, t = lane % 4;
  if constexpr (mma::kPerWord<T> == 2) {
    const int shift = (f & 1) * 16;
    const uint32_t* column = rows + r0 * stride + f / 2;
    auto elem = [&](int r) { return (column[r * stride] >> shift) & 0xffffu; };
    b[0] = elem(2 * t) | (elem(2 * t + 1) << 16);
    b[1] = elem(2 * t + 8) | (elem(2 * t + 9) << 16);
  } else {
    const uint32_t* column = rows + r0 * stride + f;
    b[0] = column[t * stride];
    b[1] = column[(t + 4) * stride];
  }
}

// Running per-row scaling of fp16 weights before they are rounded to A operands (batch_all's
// coefficients, the contrastive backward's W), where no bound is known before the weights are seen:
// each row's weights are multiplied by 2^shift, shift the largest that keeps the row's weights so far
// below 2^14 (weight_exponent). When a tile lowers it, the row's fp32 accumulator is multiplied by
// 2^(new - old) as it is next read (`rescale`, for accumulate_rows), as flash attention rescales its
// output; 2^-shift undoes it at the end, exactly. The lane's weights w[n][h][e] are of rows
// tile * 16 + g + 8 h; shift and rescale are kept for rows g, g + 8 of the kTiles row tiles from
// first_tile that the lane's warp accumulates. scratch: kWarpsPerRowTile x kRows floats; one barrier.
// shift[i][h] for a runtime i, by selects (an indexed register array would live in local memory).
template <int kTiles>
__device__ __forceinline__ int shift_of(const int (&shift)[kTiles][2], int i, int h) {
  int v = shift[0][h];
#pragma unroll
  for (int k = 1; k < kTiles; ++k) v = k == i ? shift[k][h] : v;
  return v;
}

template <int kSimTiles, int kRows, int kWarpsPerRowTile, int kTiles>
__device__ __forceinline__ void scale_row_weights(float (&w)[kSimTiles][2][2], int (&shift)[kTiles][2],
                                                  float (&rescale)[kTiles][2], float* scratch, int tile,
                                                  int first_tile, int part, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = 0.f;  // fmaxf skips NaN: a NaN weight passes through unscaled, as NaN
#pragma unroll
    for (int n = 0; n < kSimTiles; ++n) m = fmaxf(m, fmaxf(fabsf(w[n][h][0]), fabsf(w[n][h][1])));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    if (t == 0) scratch[part * kRows + tile * 16 + g + 8 * h] = m;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = 0.f;
      const int row = (first_tile + i) * 16 + g + 8 * h;
#pragma unroll
      for (int q = 0; q < kWarpsPerRowTile; ++q) m = fmaxf(m, scratch[q * kRows + row]);
      const int next = m > 0.f && !isinf(m) ? min(shift[i][h], weight_exponent(m)) : shift[i][h];
      rescale[i][h] = ldexpf(1.f, next - shift[i][h]);
      shift[i][h] = next;
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float up = ldexpf(1.f, shift_of(shift, tile - first_tile, h));
#pragma unroll
    for (int n = 0; n < kSimTiles; ++n) w[n][h][0] *= up, w[n][h][1] *= up;
  }
}

// acc rows row0 .. row0 + 16 x features f0 .. f0 + 8 (fp32 in shared memory, `stride` floats per row)
// += W . B over one 64-row k span: W's A fragments wa[ks], B's from load_b(fb, ks). The rows' values are
// first multiplied by lo_scale (rows row0 + g) and hi_scale (row0 + g + 8): a running rescale.
template <typename T, typename LoadB>
__device__ __forceinline__ void accumulate_rows(float* acc, int stride, int row0, int64_t f0,
                                                const uint32_t (&wa)[kTileCols / mma::kStepK<T>][4], int lane,
                                                LoadB&& load_b, float lo_scale = 1.f, float hi_scale = 1.f) {
  float* lo = acc + (row0 + lane / 4) * stride + f0 + 2 * (lane % 4);
  float* hi = lo + 8 * stride;
  float c[4] = {lo[0] * lo_scale, lo[1] * lo_scale, hi[0] * hi_scale, hi[1] * hi_scale};
#pragma unroll
  for (int ks = 0; ks < kTileCols / mma::kStepK<T>; ++ks) {
    uint32_t fb[2];
    load_b(fb, ks);
    mma::mma_step<T>(c, wa[ks], fb);
  }
  lo[0] = c[0], lo[1] = c[1], hi[0] = c[2], hi[1] = c[3];
}

// acc[n] += (own rows own_row .. + 16) . (tile rows other_row + 8 n .. + 8)^T over the full width,
// for the tile of other rows [j0, j0 + kTileCols); tiles are swept from j0 = 0. Own rows are
// either resident (staged once by stage_resident, `own_stride` words per row) or staged with each
// slab into a kTileStride buffer, skipped after the first tile when the width fits one slab.
// first_slab() runs on every thread after the first slab is staged, before the barrier: where a
// kernel stages its per-column values.
template <typename T, int kOwnRows, bool kResident = false, int kN, typename FirstSlab>
__device__ __forceinline__ void tile_product(float (&acc)[kN][4], uint32_t* s_own, int own_stride,
                                             StagedTile& s_other, const TileOperands<T>& op, int64_t j0,
                                             int own_row, int other_row, int lane, FirstSlab&& first_slab) {
  int64_t k0 = 0;
  do {  // once at least (d == 0: S = 0)
    __syncthreads();  // the previous step's fragment loads (and the caller's reads of staged values) are done
    if (!kResident && (j0 == 0 || op.d > kSlabK<T>)) {
      stage_slab<T>(s_own, kTileStride, kOwnRows, op.own, op.row0, op.n_own, op.d, k0, op.vec);
    }
    stage_rows<T>(s_other, op.other, j0, op.n_other, op.d, k0, op.vec);
    if (k0 == 0) first_slab();
    __syncthreads();
    const uint32_t* a_rows = s_own + own_row * own_stride + (kResident ? k0 / mma::kPerWord<T> : 0);
    constexpr int kStep = mma::kStepK<T>;
    const int steps = static_cast<int>((min(static_cast<int64_t>(kSlabK<T>), op.d - k0) + kStep - 1) / kStep);
    for (int ks = 0; ks < steps; ++ks) {
      uint32_t fa[4];
      mma::load_a(fa, a_rows + ks * 8, own_stride, lane);
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        uint32_t fb[2];
        mma::load_b(fb, &s_other[other_row + n * 8][ks * 8], kTileStride, lane);
        mma::mma_step<T>(acc[n], fa, fb);
      }
    }
    k0 += kSlabK<T>;
  } while (k0 < op.d);
}

}  // namespace lossforge

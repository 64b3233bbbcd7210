// Warp-level tensor-core product D += A B on 16 x 8 x 16 tiles (mma.sync m16n8k16, sm_80+), bf16 or
// fp16 operands with fp32 accumulation, and the fragment loads from shared memory. fp32 operands take
// the same fragments of 32-bit words, one element per word: a k step of 8 words is one m16n8k8 tf32
// product, done three times on each operand's split into a tf32 head and tail (mma_step).
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4; each
// 32-bit register holds two consecutive k elements (lower k in the low half):
//   A (16 x 16, row-major)  a[0] row g, k 2t..2t+1     a[1] row g+8, k 2t..2t+1
//                           a[2] row g, k 2t+8..2t+9   a[3] row g+8, k 2t+8..2t+9
//   B (16 x 8, column n)    b[0] k 2t..2t+1, column g  b[1] k 2t+8..2t+9, column g
//   C, D (16 x 8, fp32)     d[0], d[1] row g, columns 2t, 2t+1; d[2], d[3] row g+8, the same columns
// m16n8k8 tf32 reads the same words, one element each: a[0] row g, k t; a[1] row g+8, k t; a[2] row g,
// k t+4; a[3] row g+8, k t+4; b[0] k t, column g; b[1] k t+4, column g; C and D as above.
// Under the CUDA emulation the product is a warp collective (csrc/emulate/runtime.cpp): every lane
// posts its fragments and computes its own D elements from the whole warp's A and B.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lossforge {
namespace mma {

// Operand types of the tensor-core product (the emulation's codes as well).
enum Operand : int { kBf16 = 0, kFp16 = 1, kTf32 = 2 };

template <typename T>
struct OperandOf;
template <>
struct OperandOf<c10::BFloat16> {
  static constexpr Operand value = kBf16;
};
template <>
struct OperandOf<c10::Half> {
  static constexpr Operand value = kFp16;
};
template <>
struct OperandOf<float> {
  static constexpr Operand value = kTf32;
};

// Elements of T per 32-bit operand word, and per k step of a fragment (8 words).
template <typename T>
constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
template <typename T>
constexpr int kStepK = 8 * kPerWord<T>;

// d += a b for one warp; every lane of the warp must call it (it is .sync.aligned).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef LOSSFORGE_EMULATE
  emulate::warp_mma_m16n8k16(OperandOf<T>::value, d, a, b, __FILE__, __LINE__);
#else
  static_assert(sizeof(T) == 2, "m16n8k16 takes 16-bit operands");
  if constexpr (OperandOf<T>::value == kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// d += a b for fp32 words read as tf32 (their low 13 bits ignored); every lane must call it.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef LOSSFORGE_EMULATE
  emulate::warp_mma_m16n8k8_tf32(d, a, b, __FILE__, __LINE__);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// x rounded to tf32 (cvt.rna: 10 fraction bits, ties away from zero), as fp32 bits.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef LOSSFORGE_EMULATE
  return emulate::round_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

// An fp32 word as head + tail, both tf32: the head carries 11 significant bits, the tail the next 11,
// so head * head' + head * tail' + tail * head' misses only tail * tail' (2^-22 of the product) and the
// tail's own rounding. An infinite or NaN x has tail 0 and passes through head * head' alone: the cross
// terms take the head with such values zeroed (`finite_part`; inf * 0 there would be NaN, and a tail of
// the other sign would make inf - inf), formed where it is used, to keep one register less per word.
__device__ __forceinline__ void split_tf32(uint32_t word, uint32_t& head, uint32_t& tail) {
  const float x = __uint_as_float(word);
  head = to_tf32(x);
  const float h = __uint_as_float(head);
  tail = isfinite(h) ? to_tf32(x - h) : 0u;
}
__device__ __forceinline__ uint32_t finite_part(uint32_t head) {
  return isfinite(__uint_as_float(head)) ? head : 0u;
}

// One k step of d += A B on fragments of 32-bit words: m16n8k16 for bf16/fp16 (16 k), three m16n8k8
// tf32 products for fp32 (8 k; the small terms first), which keep fp32's precision to about 2^-21.
template <typename T>
__device__ __forceinline__ void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(T) == 2) {
    mma_m16n8k16<T>(d, a, b);
  } else {
    static_assert(OperandOf<T>::value == kTf32, "fp32 operand words");
    uint32_t ah[4], at[4], bh[2], bt[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], ah[i], at[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_tf32(b[i], bh[i], bt[i]);
    const uint32_t bp[2] = {finite_part(bh[0]), finite_part(bh[1])};
    mma_m16n8k8_tf32(d, at, bp);
    const uint32_t ap[4] = {finite_part(ah[0]), finite_part(ah[1]), finite_part(ah[2]), finite_part(ah[3])};
    mma_m16n8k8_tf32(d, ap, bt);
    mma_m16n8k8_tf32(d, ah, bh);
  }
}

// A's fragment from a shared tile of operand words: rows[r * stride + p] holds elements k = 2p, 2p + 1
// of row r (fp32: element p); `tile` points at the 16 x kStepK block's first row and word.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint32_t* tile, int stride, int lane) {
  const int g = lane / 4, t = lane % 4;
  a[0] = tile[g * stride + t];
  a[1] = tile[(g + 8) * stride + t];
  a[2] = tile[g * stride + t + 4];
  a[3] = tile[(g + 8) * stride + t + 4];
}

// B's fragment from the same layout holding B's columns as rows (B = Y^T for the tile of rows Y):
// `tile` points at the 8 columns' first row and word.
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const uint32_t* tile, int stride, int lane) {
  const int g = lane / 4, t = lane % 4;
  b[0] = tile[g * stride + t];
  b[1] = tile[g * stride + t + 4];
}

}  // namespace mma
}  // namespace lossforge

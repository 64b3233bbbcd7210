// Warp-level tensor-core product D += A B on 16 x 8 x 16 tiles (mma.sync m16n8k16, sm_80+), bf16 or
// fp16 operands with fp32 accumulation, and the fragment loads from shared memory.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4; each
// 32-bit register holds two consecutive k elements (lower k in the low half):
//   A (16 x 16, row-major)  a[0] row g, k 2t..2t+1     a[1] row g+8, k 2t..2t+1
//                           a[2] row g, k 2t+8..2t+9   a[3] row g+8, k 2t+8..2t+9
//   B (16 x 8, column n)    b[0] k 2t..2t+1, column g  b[1] k 2t+8..2t+9, column g
//   C, D (16 x 8, fp32)     d[0], d[1] row g, columns 2t, 2t+1; d[2], d[3] row g+8, the same columns
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
enum Operand : int { kBf16 = 0, kFp16 = 1 };

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

// d += a b for one warp; every lane of the warp must call it (it is .sync.aligned).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef LOSSFORGE_EMULATE
  emulate::warp_mma_m16n8k16(OperandOf<T>::value, d, a, b, __FILE__, __LINE__);
#else
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

// A's fragment from a shared tile of element pairs: rows[r * stride + p] holds elements k = 2p, 2p + 1
// of row r; `tile` points at the 16 x 16 block's first row and pair.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint32_t* tile, int stride, int lane) {
  const int g = lane / 4, t = lane % 4;
  a[0] = tile[g * stride + t];
  a[1] = tile[(g + 8) * stride + t];
  a[2] = tile[g * stride + t + 4];
  a[3] = tile[(g + 8) * stride + t + 4];
}

// B's fragment from the same layout holding B's columns as rows (B = Y^T for the tile of rows Y):
// `tile` points at the 8 columns' first row and pair.
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const uint32_t* tile, int stride, int lane) {
  const int g = lane / 4, t = lane % 4;
  b[0] = tile[g * stride + t];
  b[1] = tile[g * stride + t + 4];
}

}  // namespace mma
}  // namespace lossforge

// Device helpers shared by the lossforge kernels: element conversion, 16-byte packets, cache-hinted
// loads and stores, and the walk over a row split into a scalar head, 16-byte body and scalar tail.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The dynamic shared memory of a launch, as an array of `type` (the emulation defines its own).
#ifndef LOSSFORGE_DYNAMIC_SMEM
#define LOSSFORGE_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace lossforge {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr float kNormEps = 1e-12f;  // the normalisation's floor on |x| (F.normalize's eps in the references)

// max(v, eps) that keeps a NaN, as torch's clamp_min.
__device__ __forceinline__ float at_least_norm_eps(float v) { return v < kNormEps ? kNormEps : v; }

// The normalisation's factors of a row of norm n (every family's inverse-norm kernel): inv = 1 / max(n,
// eps), and radial = inv where the clamp is off, else 0 (inv is then constant: no radial gradient).
// kTwice, rows normalised twice (triplet cosine with normalize): with u = n inv the once-normalised
// row's norm, inv = (1 / max(n, eps)) / max(u, eps), radial = 1 / n where u >= eps, else 0. A NaN n
// gives NaN in both.
template <bool kTwice = false>
__device__ __forceinline__ void norm_factors(float n, float& inv, float& radial) {
  inv = 1.f / at_least_norm_eps(n);
  radial = n < kNormEps ? 0.f : inv;
  if constexpr (kTwice) {
    const float u = n * inv;
    inv = inv / at_least_norm_eps(u);
    radial = u < kNormEps ? 0.f : 1.f / n;
  }
}

// How one element type is stored and converted. All arithmetic is in float.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Raw = float;
  static constexpr int kPerPacket = 4;
  __device__ __forceinline__ static float load(Raw r) { return r; }
  __device__ __forceinline__ static Raw store(float v) { return v; }
};

template <>
struct Elem<c10::Half> {
  using Raw = uint16_t;
  static constexpr int kPerPacket = 8;
  __device__ __forceinline__ static float load(Raw r) { return __half2float(__ushort_as_half(r)); }
  __device__ __forceinline__ static Raw store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Elem<c10::BFloat16> {
  using Raw = uint16_t;
  static constexpr int kPerPacket = 8;
  __device__ __forceinline__ static float load(Raw r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }
  __device__ __forceinline__ static Raw store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// v rounded to T and back: the value a T operand carries.
template <typename T>
__device__ __forceinline__ float as_stored(float v) {
  return Elem<T>::load(Elem<T>::store(v));
}

template <typename T>
__device__ __forceinline__ float load_elem(const T* p) {
  return Elem<T>::load(*reinterpret_cast<const typename Elem<T>::Raw*>(p));
}

// Stores v in T; returns the value stored.
template <typename T>
__device__ __forceinline__ float store_elem(T* p, float v) {
  const typename Elem<T>::Raw raw = Elem<T>::store(v);
  *reinterpret_cast<typename Elem<T>::Raw*>(p) = raw;
  return Elem<T>::load(raw);
}

// 16-byte packet <-> kPerPacket floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float (&v)[Elem<T>::kPerPacket]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (Elem<T>::kPerPacket == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = Elem<T>::load(static_cast<uint16_t>(i % 2 ? w[i / 2] >> 16 : w[i / 2] & 0xffffu));
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(Elem<T>::store(lo)) | (static_cast<uint32_t>(Elem<T>::store(hi)) << 16);
}

// One cvt instruction for two values on sm_80+.
template <>
__device__ __forceinline__ uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<c10::Half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&v)[Elem<T>::kPerPacket]) {
  if constexpr (Elem<T>::kPerPacket == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// Loads of data read once (evict-first) and of data we want to find again in L2 (default policy).
// Plain (coherent) loads rather than the read-only path: the gradient may alias the logits.
__device__ __forceinline__ uint4 ld_once(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld_keep(const void* p) { return *reinterpret_cast<const uint4*>(p); }
// Outputs are not read again by the kernel: streaming stores keep them from evicting the logits.
__device__ __forceinline__ void st_once(void* p, const uint4& v) { __stcs(reinterpret_cast<uint4*>(p), v); }

// 2^x on the special-function unit (2 ulp; results below 2^-126 flush to 0, which every caller
// adds to or multiplies a term of order 1 with).
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef LOSSFORGE_EMULATE
  return emulate::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
// Asks L2 for the first `bytes` of p (one request per 128-byte line, spread over the block): a
// block about to reduce a row and write its gradient keeps DRAM busy with the next row meanwhile.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = threadIdx.x * int64_t{128}; off < bytes; off += blockDim.x * int64_t{128}) {
#ifndef LOSSFORGE_EMULATE  // a hint only: nothing to emulate
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
#endif
  }
}

// The 16 bytes of kPerPacket elements of T at p: one 16-byte load when `vec`, else element by
// element (for an array whose alignment differs from the one the row walk was aligned to).
template <typename T, bool kKeep = false>
__device__ __forceinline__ uint4 load_raw(const T* p, bool vec) {
  if (vec) return kKeep ? ld_keep(p) : ld_once(p);
  using Raw = typename Elem<T>::Raw;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(Raw) == 4) {
      w[i] = *reinterpret_cast<const uint32_t*>(p + i);
    } else {
      const Raw* r = reinterpret_cast<const Raw*>(p);
      w[i] = static_cast<uint32_t>(r[2 * i]) | (static_cast<uint32_t>(r[2 * i + 1]) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ void store_packet(T* p, bool vec, const float (&v)[Elem<T>::kPerPacket]) {
  if (vec) {
    st_once(p, pack<T>(v));
  } else {
#pragma unroll
    for (int i = 0; i < Elem<T>::kPerPacket; ++i) store_elem(p + i, v[i]);
  }
}

// N fp32 values at p (class weights): float4 loads when p is 16-byte aligned.
template <int N>
__device__ __forceinline__ void load_floats(const float* p, bool vec, float (&v)[N]) {
  if (vec) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p + i));
      v[i] = f.x, v[i + 1] = f.y, v[i + 2] = f.z, v[i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = __ldg(p + i);
  }
}

__device__ __forceinline__ bool same_phase(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15u) == 0;
}

// A row of n elements of T split so that the body starts on a 16-byte boundary of `base`:
// [0, head) scalar, packets k = 0..packets-1 at head + k*kPerPacket, [body_end, n) scalar.
template <typename T>
struct RowSplit {
  static constexpr int kN = Elem<T>::kPerPacket;
  int64_t head, packets, body_end;

  __device__ __forceinline__ RowSplit(const T* base, int64_t n) {
    const int64_t mis = static_cast<int64_t>((16u - (reinterpret_cast<uintptr_t>(base) & 15u)) & 15u) / sizeof(T);
    head = mis < n ? mis : n;
    packets = (n - head) / kN;
    body_end = head + packets * kN;
  }
  __device__ __forceinline__ int64_t first(int64_t k) const { return head + k * kN; }
};

// Writes v over the n elements of the row at g (ignored or invalid rows' gradients).
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

// use(k, load(k)) for k = start, start + step, ... < end, with the loads of U consecutive k issued
// before any use so that U packets per thread are in flight. Returns the first k >= end.
template <int U, typename Load, typename Use>
__device__ __forceinline__ int64_t stream_packets(int64_t k, int64_t end, int64_t step, Load load, Use use) {
  using Loaded = decltype(load(k));
  for (; k + (U - 1) * step < end; k += U * step) {
    Loaded buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) buf[u] = load(k + u * step);
#pragma unroll
    for (int u = 0; u < U; ++u) use(k + u * step, buf[u]);
  }
  for (; k < end; k += step) use(k, load(k));
  return k;
}

// f(j, v) over the n elements of the row at x, as floats: v is one element of the scalar head or
// tail (float[1]) or a 16-byte packet (float[kPerPacket]) at element j, kU packets in flight per
// thread; kKeep: the row stays in L2 for another pass.
template <typename T, int kU, bool kKeep, typename F>
__device__ __forceinline__ void walk_row(const T* x, int64_t n, F&& f) {
  constexpr int kN = Elem<T>::kPerPacket;
  const int tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const RowSplit<T> rs(x, n);
  auto scalar = [&](int64_t j) {
    float v[1] = {load_elem(x + j)};
    f(j, v);
  };
  if (tid < rs.head) scalar(tid);
  if (rs.body_end + tid < n) scalar(rs.body_end + tid);
  auto load = [&](int64_t k) { return load_raw<T, kKeep>(x + rs.first(k), true); };
  auto use = [&](int64_t k, const uint4& p) {
    float v[kN];
    unpack<T>(p, v);
    f(rs.first(k), v);
  };
  stream_packets<kU>(tid, rs.packets, nt, load, use);
}

// N values at p: a packet (16-byte store when `vec`) or one element of a row's head or tail.
template <typename T, int N>
__device__ __forceinline__ void store_vals(T* p, bool vec, const float (&v)[N]) {
  if constexpr (N == Elem<T>::kPerPacket) {
    store_packet<T>(p, vec, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) store_elem(p + i, v[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block in a fixed order (deterministic); the result is valid in thread 0.
// `scratch` holds one float per warp; the caller syncs before reusing it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarpSize;
    v = lane < warps ? scratch[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

}  // namespace lossforge

// CUDA emulation: the kernels of csrc/ compiled for the host and run on CPU tensors
// (LOSSFORGE_CUDA_EMULATE=1). Force-included before every source; the stub headers beside it
// (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, c10/cuda/*) stand in for the toolkit's and bring this in.
//
// What it models: every thread of a block runs (as a fiber, one block after another), with real
// __syncthreads barriers between them; warp shuffles, votes and barrier reductions exchange values
// among the 32 lanes of a warp (or the whole block); dynamic shared memory is a per-block arena of
// the launch's size, and static __shared__ variables are thread_local function statics; both are
// filled with 0xff bytes (NaN as float, half or bfloat16, -1 as an integer) before every block, so a
// read before any thread wrote shows in the results; launch limits (1024 threads, 48 KiB of dynamic
// shared memory unless opted in to) are checked as the driver would; half and bfloat16 conversions
// round to nearest even; the fast-math intrinsics flush subnormal results to zero as the GPU does.
// It reports, as an exception naming the source line, a __syncthreads that not every thread of the
// block reaches (some exited, or wait at another barrier) and a warp collective that a lane of its
// mask never joins. It does not model: memory ordering or races between threads or blocks, timing,
// occupancy, or the ulp error of the approximate intrinsics.
#pragma once

#define LOSSFORGE_EMULATE 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per OS thread, so that one block's threads (fibers of one OS thread) share them; the runtime fills
// this module's whole TLS block (nothing else lives there) with 0xff before every block.
#define __shared__ static thread_local
#define LOSSFORGE_DYNAMIC_SMEM(type, name) type* const name = ::lossforge::emulate::dynamic_smem<type>()
#define LOSSFORGE_DISPATCH_KEY CPU

// ---- what device code finds in the global namespace ----
using std::isfinite;
using std::isinf;
using std::isnan;
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// ---- vector types and built-in variables ----
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) int2 { int x, y; };
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// Set by the scheduler before it resumes a thread (blocks and threads run one at a time).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace lossforge {
namespace emulate {

// Block-level operations, implemented by the scheduler (runtime.cpp). `file`/`line` name the call.
void sync_block(const char* file, int line);
int sync_block_reduce(int value, int op, const char* file, int line);  // op: 0 or, 1 and, 2 count
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* what, const char* file, int line);
unsigned warp_ballot(unsigned mask, bool pred, const char* file, int line);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += a b for the calling lane's fragments
// (operand 0 bf16, 1 fp16; csrc/mma.cuh has the layout), a collective of the whole warp.
void warp_mma_m16n8k16(int operand, float* d, const uint32_t* a, const uint32_t* b, const char* file, int line);
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, the same collective on fp32 words read as tf32.
void warp_mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const char* file, int line);
void* dynamic_smem_base();
using Body = void (*)(void* closure);
void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, Body body, void* closure);
void set_max_dynamic_smem(const void* kernel, int bytes);

template <typename T>
T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_base());
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// cvt.rna.tf32.f32: x rounded to 10 fraction bits, ties away from zero; inf and NaN pass as they are.
inline uint32_t round_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;  // a carry into the exponent is the rounding up (to inf at the top)
}

inline int lane_id() {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(tid % 32);
}

// ex2.approx.ftz.f32: subnormal inputs and results are flushed to zero.
inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
inline float lg2_approx_ftz(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? -INFINITY : std::log2(x);
}

// kernel<<<grid, block, smem>>>(args...): every block, every thread.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  std::tuple<std::decay_t<Params>...> argv(std::forward<Args>(args)...);  // the launch's parameter copy
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...>* argv;
  } closure{kernel, &argv};
  run_grid(grid, block, smem, reinterpret_cast<const void*>(kernel),
           [](void* c) {
             auto* cl = static_cast<Closure*>(c);
             std::apply(cl->kernel, *cl->argv);  // each thread gets its own copy of the parameters
           },
           &closure);
}

}  // namespace emulate
}  // namespace lossforge

// ---- barriers, warp collectives ----
#define __syncthreads() ::lossforge::emulate::sync_block(__FILE__, __LINE__)
#define __syncthreads_or(p) ::lossforge::emulate::sync_block_reduce((p) != 0, 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::lossforge::emulate::sync_block_reduce((p) != 0, 1, __FILE__, __LINE__)
#define __syncthreads_count(p) ::lossforge::emulate::sync_block_reduce((p) != 0, 2, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) ::lossforge::emulate::shfl(mask, v, src, 0, "__shfl_sync", __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::lossforge::emulate::shfl(mask, v, m, 1, "__shfl_xor_sync", __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::lossforge::emulate::shfl(mask, v, d, 2, "__shfl_down_sync", __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::lossforge::emulate::shfl(mask, v, d, 3, "__shfl_up_sync", __FILE__, __LINE__)
#define __ballot_sync(mask, p) ::lossforge::emulate::warp_ballot(mask, (p) != 0, __FILE__, __LINE__)
#define __any_sync(mask, p) (::lossforge::emulate::warp_ballot(mask, (p) != 0, __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) \
  (::lossforge::emulate::warp_ballot(mask, (p) != 0, __FILE__, __LINE__) == static_cast<unsigned>(mask))
#define __syncwarp(...) ((void)::lossforge::emulate::warp_ballot(0xffffffffu, true, __FILE__, __LINE__))

namespace lossforge {
namespace emulate {
// kind: 0 from lane `arg`, 1 from lane ^ arg, 2 from lane + arg (own value past 31), 3 from lane - arg.
template <typename T>
T shfl(unsigned mask, T v, int arg, int kind, const char* what, const char* file, int line) {
  const int lane = lane_id();
  int src = kind == 0 ? (arg & 31) : kind == 1 ? (lane ^ arg) : kind == 2 ? lane + arg : lane - arg;
  if (src < 0 || src > 31) src = lane;
  return from_bits<T>(warp_exchange(mask, to_bits(v), src, what, file, line));
}
}  // namespace emulate
}  // namespace lossforge

// ---- loads, stores, atomics ----
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, const T& v) { *p = v; }
template <typename T>
inline void __stcg(T* p, const T& v) { *p = v; }
// Threads run one at a time and never switch inside an atomic: plain read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T>
inline T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <typename T>
inline T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <typename T>
inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- bit casts and integer intrinsics ----
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }

// ---- fast-math intrinsics (the SFU's approximations, modelled as their exact values with ftz) ----
inline float __expf(float x) { return ::lossforge::emulate::ex2_approx_ftz(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return ::lossforge::emulate::ex2_approx_ftz(x * 3.3219280948873622f); }
inline float __logf(float x) { return ::lossforge::emulate::lg2_approx_ftz(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return ::lossforge::emulate::lg2_approx_ftz(x); }
inline float __powf(float x, float y) {
  return ::lossforge::emulate::ex2_approx_ftz(y * ::lossforge::emulate::lg2_approx_ftz(x));
}
// a / b as the GPU's approximate division: 0 for 2^126 < |b| < 2^128.
inline float __fdividef(float a, float b) {
  const float ab = std::fabs(b);
  return ab > 8.50705917e37f && ab < INFINITY ? 0.f * a : a / b;
}
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// ---- half and bfloat16 (stored bits; conversions round to nearest even, as cvt.rn does) ----
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.bits, c10::BFloat16::from_bits()));
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- the runtime API the host code calls ----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
using cudaStream_t = struct lossforge_emulated_stream*;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrReservedSharedMemoryPerBlock,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrL2CacheSize,
};
// The emulated device's limits: an H100 SXM's.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 232448; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrL2CacheSize: *value = 50331648; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributePreferredSharedMemoryCarveout };
enum { cudaSharedmemCarveoutMaxShared = 100 };
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    ::lossforge::emulate::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}

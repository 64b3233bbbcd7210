// Host-side helpers for the kernel launchers: argument checks with clear messages, dtype and
// option dispatch to template instantiations, device limits and the per-row launch plan.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

namespace lossforge {

// ---- checks (ValueError / TypeError in Python) ----

inline void check_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like the first input, got ",
                    t.device());
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

inline bool is_kernel_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

inline void check_kernel_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

// Rows of a 2-D tensor whose elements within a row are adjacent (stride(1) == 1).
inline void check_unit_inner_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
                    " must have stride(1) == 1 (classes adjacent in memory), got strides ", t.strides());
}

inline void check_scalar_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  check_on(op, name, t, ref);
  check_dtype(op, name, t, at::kFloat);
  TORCH_CHECK_VALUE(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
}

// ---- dispatch ----

template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", st, " (float32, float16 or bfloat16 expected)");
  }
}

// f(std::true_type) or f(std::false_type): a runtime flag becomes a template argument.
template <typename F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---- device limits and launch plans ----

inline int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

inline unsigned int grid_for(int64_t blocks) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)));
}

// Kernels are compiled with __launch_bounds__(1024), i.e. at most 64 registers per thread, so an SM
// holds 1024 / threads blocks by registers (65536 per SM).
constexpr int kRegisterLimitedThreadsPerSm = 1024;
// Upper bound of the static shared memory of a row kernel (its reduction scratch).
constexpr int64_t kRowStaticSmem = 1024;

struct RowPlan {
  int threads;
  int64_t resident;       // blocks of this plan an SM holds at once
  int64_t cache_packets;  // leading 16-byte packets of a row kept in shared memory between passes
  size_t smem;
  int64_t prefetch_bytes;  // of the block's next row, asked of L2 once the current row is read
};

// A tuning knob from the environment (bench/NOTES.md lists them), or `fallback` when unset.
inline double env_knob(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atof(v) : fallback;
}

// Default L2 prefetch of the next row, in KiB (LOSSFORGE_ROW_PREFETCH_KB overrides; 0 = off).
constexpr double kRowPrefetchKb = 0;

// One block per row. `packets`: 16-byte packets in a row; `unroll`: packets in flight per thread.
// About four rounds of `unroll` packets per thread, in blocks of up to 512 threads (256 without a
// cache), so that several rows share an SM and one row's reduction overlaps another's streaming.
// With `cache`, the row (or its head) lives in shared memory between the two passes; if the
// uncached tails of all rows in flight would take more than half of L2, use one 1024-thread block
// per SM with the largest cache instead, so that the re-read still hits L2.
// Knobs: LOSSFORGE_ROW_THREADS fixes the block size, LOSSFORGE_ROW_L2_SHARE the share of L2 the
// re-read tails may take (default 0.5), LOSSFORGE_ROW_CACHE=0 keeps nothing in shared memory,
// LOSSFORGE_ROW_PREFETCH_KB the L2 prefetch of the next row.
inline RowPlan plan_rows(int64_t packets, int unroll, bool cache, int device) {
  const int forced = static_cast<int>(env_knob("LOSSFORGE_ROW_THREADS", 0));
  const bool pinned = forced >= 32 && forced <= 1024 && (forced & (forced - 1)) == 0;
  const int64_t cap = cache ? 512 : 256;
  const int64_t rounds = (packets + 4 * unroll - 1) / (4 * unroll);
  const int threads = pinned ? forced : static_cast<int>(std::clamp<int64_t>(next_pow2(rounds), 32, cap));
  const double prefetch_kb = env_knob("LOSSFORGE_ROW_PREFETCH_KB", kRowPrefetchKb);
  RowPlan p{threads, std::clamp<int64_t>(kRegisterLimitedThreadsPerSm / threads, 1, 32), 0, 0,
            static_cast<int64_t>(std::max(0.0, prefetch_kb) * 1024)};
  if (!cache || env_knob("LOSSFORGE_ROW_CACHE", 1) == 0) return p;
  const int64_t sm_smem = device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  const int64_t optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t reserved = device_attr(cudaDevAttrReservedSharedMemoryPerBlock, device);
  const int64_t sms = device_attr(cudaDevAttrMultiProcessorCount, device);
  const int64_t l2 = device_attr(cudaDevAttrL2CacheSize, device);
  auto budget = [&](int64_t blocks_per_sm) {
    const int64_t b = std::min(optin, sm_smem / blocks_per_sm - reserved) - kRowStaticSmem;
    return std::max<int64_t>(0, b / 16);
  };
  int64_t cached = std::min(packets, budget(p.resident));
  const double l2_share = env_knob("LOSSFORGE_ROW_L2_SHARE", 0.5);
  if (!pinned && cached < packets && sms * p.resident * (packets - cached) * 16 > l2 * l2_share) {
    p.threads = 1024;
    p.resident = 1;
    cached = std::min(packets, budget(1));
  }
  p.cache_packets = cached;
  p.smem = static_cast<size_t>(cached) * 16;
  return p;
}

// One block per row; with a prefetch, a persistent grid instead (each resident block walks rows
// block, block + grid, ...), so that a block knows which row it reads next.
inline unsigned int grid_for_rows(const RowPlan& p, int64_t rows, int device) {
  if (p.prefetch_bytes == 0) return grid_for(rows);
  return grid_for(std::min(rows, p.resident * device_attr(cudaDevAttrMultiProcessorCount, device)));
}

// Lets `kernel` use `smem` bytes of dynamic shared memory (above the 48 KiB default).
template <typename K>
void allow_smem(K kernel, size_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
  }
}

}  // namespace lossforge

// Host-side helpers of the kernel entry points: argument checks with clear messages, dtype and
// option dispatch to template instantiations, device limits for the per-row launch plan, and the
// launch itself (device guard, current stream, shared-memory opt-in, error check).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "row_plan.h"

// The dispatch key the ops register for: CUDA, or CPU when the kernels are emulated on the host.
#ifndef LOSSFORGE_DISPATCH_KEY
#define LOSSFORGE_DISPATCH_KEY CUDA
#endif

namespace lossforge {

// ---- checks (ValueError / TypeError in Python) ----

inline void check_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like the first input, got ",
                    t.device());
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
#ifdef LOSSFORGE_EMULATE
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": ", name, " must be a CPU tensor (CUDA emulation), got device ", t.device());
#else
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
#endif
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

// A contiguous fp32 tensor of the given shape on ref's device (a kernel's output or saved stats).
inline void check_f32_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                           at::IntArrayRef shape) {
  check_on(op, name, t, ref);
  check_dtype(op, name, t, at::kFloat);
  check_shape(op, name, t, shape);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// A gradient buffer for the rows of `logits`: its shape, dtype and device, unit column stride, and
// rows that do not overlap (each row is written by one block).
inline void check_grad_buffer(const char* op, const at::Tensor& grad, const at::Tensor& logits) {
  check_on(op, "grad", grad, logits);
  check_dtype(op, "grad", grad, logits.scalar_type());
  check_shape(op, "grad", grad, logits.sizes());
  check_unit_inner_stride(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1), op,
                    ": grad rows must not overlap (stride(0) >= C), got strides ", grad.strides());
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
// 16-byte loads of a contiguous (rows, d) tensor: 16-byte aligned, and each row whole 16-byte packets.
inline bool packet_rows(const at::Tensor& t) { return t.size(-1) * t.element_size() % 16 == 0 && aligned16(t); }
// Elements of t per 32-bit operand word of the tensor-core tiles (2 for bf16/fp16, 1 for fp32).
inline int per_word(const at::Tensor& t) { return static_cast<int>(4 / t.element_size()); }

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

// The tensor-core kernels' element types: f(c10::Half{}) or f(c10::BFloat16{}).
template <typename F>
void dispatch_half(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", st, " (float16 or bfloat16 expected)");
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

// ---- products (cuBLAS through torch, on the current stream) ----

// out (rows, n) fp32 = a (rows, k) . b (k, n); half inputs accumulate straight into fp32 (mm's
// out_dtype overload), fp32 inputs follow torch's matmul precision (full fp32 unless the caller
// allowed TF32). Emulated, the CPU has no out_dtype product: the half inputs are widened first,
// which gives the same exact products and fp32 sums.
inline void product_fp32_out(const at::Tensor& a, const at::Tensor& b, at::Tensor out) {
  if (a.size(1) == 0) {  // an empty sum
    out.zero_();
  } else if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
#ifdef LOSSFORGE_EMULATE
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
#else
    at::mm_out(out, a, b, at::kFloat);
#endif
  }
}

// ---- device limits and launch plans ----

inline int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

// The limits plan_rows needs, read off the device.
inline DeviceLimits device_limits(int device) {
  return {device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
          device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          device_attr(cudaDevAttrReservedSharedMemoryPerBlock, device),
          device_attr(cudaDevAttrMultiProcessorCount, device), device_attr(cudaDevAttrL2CacheSize, device)};
}

// ---- launch ----

// kernel<<<grid, block, smem>>>(args...) on the current stream of `device`, with the device made
// current first; dynamic shared memory above the 48 KiB default is opted in to (per device).
template <typename... Params, typename... Args>
void launch(c10::Device device, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  const c10::cuda::CUDAGuard guard(device);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
  }
#ifdef LOSSFORGE_EMULATE
  emulate::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream(device.index())>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lossforge

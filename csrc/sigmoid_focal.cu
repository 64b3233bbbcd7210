// Sigmoid focal loss with torchvision's semantics, elementwise over n elements (contract:
// ops/sigmoid_focal.py's docstring, checked in Python before every call).
//
// Grid-stride over 16-byte packets of input and target, 2 packets in flight per thread; a scalar
// loop covers the tail (and whole tensors whose pointers are not 16-byte aligned). The forward
// writes the elementwise loss, or with reduce=True one fp32 partial sum per block (summed into
// `out` in a fixed order by at::sum_out afterwards: deterministic, no atomics); with a gradient
// buffer it also writes grad_factor * d loss / d input in the same pass (grad_factor read on the device).
// Designed traffic per element (bf16): forward reduced 4 B (input + target), elementwise +2 B,
// gradient +2 B; backward 8 B (input, target, grad_out, grad). Nothing is read twice.
// Compile facts (nvcc 13.0, -O3, ptxas -v): 38-48 registers forward, 48-64 backward, no spills and
// no stack frame on sm_80 and sm_90.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "common.cuh"
#include "host_utils.h"

namespace lossforge {
namespace {

constexpr int kThreads = 256;
template <typename T>
constexpr bool kFastMath = !std::is_same_v<T, float>;  // see focal_elem
constexpr int kUnroll = 2;

struct SfArgs {
  const void* x;
  const void* t;
  const void* go;  // backward: grad_out
  void* out;       // forward elementwise loss
  void* grad;
  float* partial;      // forward reduced: one sum per block
  const float* grad_factor;  // forward with a gradient: 0-dim fp32 on the device
  int64_t n;
  float alpha, gamma;
  bool vec;  // every pointer 16-byte aligned
};

// The per-element arithmetic (an exp, a log, two divisions, a power) is what bounds this kernel,
// not memory: with kFast (half-precision inputs) it uses the special-function unit's
// approximations, whose errors (~1e-6 relative, ~4e-7 absolute for the log) stay far below the
// inputs' own rounding (2^-9 relative for bf16); float inputs keep the accurate library functions.
template <bool kFast>
__device__ __forceinline__ float pow_gamma(float m, float gamma) {
  if (gamma == 2.f) return m * m;
  if (gamma == 1.f) return m;
  return kFast ? __powf(m, gamma) : powf(m, gamma);
}

template <bool kFast>
__device__ __forceinline__ float div_(float a, float b) {
  return kFast ? __fdividef(a, b) : a / b;
}

// Loss and d loss / dx of one element. With m = 1 - p_t and q = m^gamma:
// loss = a_t * ce * q, dloss/dx = a_t * q * ((p - t) + gamma * ce * r), r = p (1 - p)(1 - 2t) / m,
// which is the derivative of q divided by gamma * q, bounded by 1: finite for every gamma >= 0.
template <bool kGrad, bool kFast>
__device__ __forceinline__ float2 focal_elem(float x, float t, float alpha, float gamma) {
  const float e = kFast ? __expf(-fabsf(x)) : expf(-fabsf(x));
  const float inv = div_<kFast>(1.f, 1.f + e);
  const float p = x >= 0.f ? inv : e * inv;   // sigmoid(x)
  const float pm = x >= 0.f ? e * inv : inv;  // 1 - sigmoid(x), without cancellation
  // BCE-with-logits, max(x, 0) - t x + log(1 + e^-|x|): for a finite x as (1 - t) x or -t x, without
  // the cancellation of torch's (1 - t) x + max(-x, 0) at x < 0 (1e-5 relative for x = -8, t = 0.002);
  // an infinite x takes torch's form, for torch's inf or NaN
  const float lin = fabsf(x) < INFINITY ? (x >= 0.f ? (1.f - t) * x : -t * x) : fmaf(1.f - t, x, fmaxf(-x, 0.f));
  const float ce = lin + (kFast ? __logf(1.f + e) : log1pf(e));
  const float m = fmaf(p, 1.f - t, pm * t);
  const float q = gamma == 0.f ? 1.f : (m > 0.f ? pow_gamma<kFast>(m, gamma) : 0.f);
  const float at = alpha >= 0.f ? fmaf(alpha, t, (1.f - alpha) * (1.f - t)) : 1.f;
  float2 out;
  out.x = at * ce * q;
  out.y = 0.f;
  if constexpr (kGrad) {
    const float p_minus_t = fmaf(p, 1.f - t, -pm * t);
    float d = p_minus_t;
    if (gamma != 0.f && m > 0.f) d = fmaf(gamma * ce, div_<kFast>(p * pm * (1.f - 2.f * t), m), p_minus_t);
    out.y = at * q * d;
  }
  return out;
}

// N consecutive elements of type G at p as floats (N is a multiple of G's packet size).
template <typename G, int N>
__device__ __forceinline__ void load_n(const G* p, bool vec, float (&v)[N]) {
  constexpr int kG = Elem<G>::kPerPacket;
  static_assert(N % kG == 0, "packet sizes must divide");
#pragma unroll
  for (int b = 0; b < N / kG; ++b) {
    float part[kG];
    unpack<G>(load_raw<G>(p + b * kG, vec), part);
#pragma unroll
    for (int i = 0; i < kG; ++i) v[b * kG + i] = part[i];
  }
}

template <typename T, bool kReduce, bool kGrad>
__global__ void __launch_bounds__(kThreads) sigmoid_focal_fwd_kernel(const SfArgs a) {
  constexpr int kN = Elem<T>::kPerPacket;
  const T* x = static_cast<const T*>(a.x);
  const T* t = static_cast<const T*>(a.t);
  T* out = static_cast<T*>(a.out);
  T* grad = static_cast<T*>(a.grad);
  const float scale = kGrad ? *a.grad_factor : 0.f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float sum = 0.f;

  auto scalar = [&](int64_t j) {
    const float2 r = focal_elem<kGrad, kFastMath<T>>(load_elem(x + j), load_elem(t + j), a.alpha, a.gamma);
    if constexpr (kReduce) {
      sum += r.x;
    } else {
      store_elem(out + j, r.x);
    }
    if constexpr (kGrad) store_elem(grad + j, r.y * scale);
  };
  int64_t tail = 0;
  if (a.vec) {
    struct In {
      uint4 x, t;
    };
    auto load = [&](int64_t k) { return In{ld_once(x + k * kN), ld_once(t + k * kN)}; };
    auto use = [&](int64_t k, const In& in) {
      float xv[kN], tv[kN], lv[kN], gv[kN];
      unpack<T>(in.x, xv);
      unpack<T>(in.t, tv);
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const float2 r = focal_elem<kGrad, kFastMath<T>>(xv[i], tv[i], a.alpha, a.gamma);
        lv[i] = r.x;
        gv[i] = r.y * scale;
      }
      if constexpr (kReduce) {
#pragma unroll
        for (int i = 0; i < kN; ++i) sum += lv[i];
      } else {
        st_once(out + k * kN, pack<T>(lv));
      }
      if constexpr (kGrad) st_once(grad + k * kN, pack<T>(gv));
    };
    stream_packets<kUnroll>(first, a.n / kN, step, load, use);
    tail = a.n / kN * kN;
  }
  for (int64_t j = tail + first; j < a.n; j += step) scalar(j);

  if constexpr (kReduce) {
    __shared__ float scratch[kThreads / kWarpSize];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) a.partial[blockIdx.x] = sum;
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) sigmoid_focal_bwd_kernel(const SfArgs a) {
  constexpr int kN = Elem<T>::kPerPacket;
  const T* x = static_cast<const T*>(a.x);
  const T* t = static_cast<const T*>(a.t);
  const G* go = static_cast<const G*>(a.go);
  T* grad = static_cast<T*>(a.grad);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (a.vec) {
    struct In {
      uint4 x, t;
      float go[kN];
    };
    auto load = [&](int64_t k) {
      In in{ld_once(x + k * kN), ld_once(t + k * kN), {}};
      load_n<G, kN>(go + k * kN, true, in.go);
      return in;
    };
    auto use = [&](int64_t k, const In& in) {
      float xv[kN], tv[kN], gv[kN];
      unpack<T>(in.x, xv);
      unpack<T>(in.t, tv);
#pragma unroll
      for (int i = 0; i < kN; ++i) gv[i] = in.go[i] * focal_elem<true, kFastMath<T>>(xv[i], tv[i], a.alpha, a.gamma).y;
      st_once(grad + k * kN, pack<T>(gv));
    };
    stream_packets<kUnroll>(first, a.n / kN, step, load, use);
    tail = a.n / kN * kN;
  }
  for (int64_t j = tail + first; j < a.n; j += step) {
    const float d = focal_elem<true, kFastMath<T>>(load_elem(x + j), load_elem(t + j), a.alpha, a.gamma).y;
    store_elem(grad + j, load_elem(go + j) * d);
  }
}

// ---- host side ----

constexpr const char* kFwd = "sigmoid_focal_fwd_cuda";
constexpr const char* kBwd = "sigmoid_focal_bwd_cuda";

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_on(op, name, t, input);
  check_dtype(op, name, t, input.scalar_type());
  check_shape(op, name, t, input.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_inputs(const char* op, const at::Tensor& input, const at::Tensor& target) {
  check_cuda(op, "input", input);
  check_kernel_float(op, "input", input);
  TORCH_CHECK_VALUE(input.is_contiguous(), op, ": input must be contiguous, got strides ", input.strides());
  check_like_input(op, "target", target, input);
}

unsigned int blocks_for(int64_t n, int elems_per_packet, int device) {
  const int64_t units = std::max<int64_t>(1, n / elems_per_packet);
  const int64_t sms = device_attr(cudaDevAttrMultiProcessorCount, device);
  return grid_for(std::min<int64_t>((units + kThreads * kUnroll - 1) / (kThreads * kUnroll),
                                    sms * (2048 / kThreads)));
}

void sigmoid_focal_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& grad_factor, const at::Tensor& out,
                            const std::optional<at::Tensor>& grad, double alpha, double gamma, bool reduce) {
  check_inputs(kFwd, input, target);
  if (reduce) {
    check_scalar_f32(kFwd, "out", out, input);
  } else {
    check_like_input(kFwd, "out", out, input);
  }
  if (grad.has_value()) check_like_input(kFwd, "grad", *grad, input);
  TORCH_CHECK_VALUE(grad_factor.has_value() == grad.has_value(), kFwd,
                    ": grad_factor must be given exactly when grad is");
  if (grad_factor.has_value()) check_scalar_f32(kFwd, "grad_factor", *grad_factor, input);
  const int64_t n = input.numel();
  if (n == 0) {
    if (reduce) out.zero_();
    return;
  }

  SfArgs a{};
  a.x = input.data_ptr();
  a.t = target.data_ptr();
  a.n = n;
  a.alpha = static_cast<float>(alpha);
  a.gamma = static_cast<float>(gamma);
  a.vec = aligned16(input) && aligned16(target) && (!grad.has_value() || aligned16(*grad)) &&
          (reduce || aligned16(out));
  if (grad.has_value()) {
    a.grad = grad->data_ptr();
    a.grad_factor = grad_factor->data_ptr<float>();
  }
  if (!reduce) a.out = out.data_ptr();
  dispatch_float(input.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int blocks = blocks_for(n, Elem<T>::kPerPacket, input.get_device());
    at::Tensor partial;
    if (reduce) {
      partial = at::empty({static_cast<int64_t>(blocks)}, input.options().dtype(at::kFloat));
      a.partial = partial.data_ptr<float>();
    }
    with_flag(reduce, [&](auto r) {
      with_flag(grad.has_value(), [&](auto g) {
        launch(input.device(), &sigmoid_focal_fwd_kernel<T, decltype(r)::value, decltype(g)::value>, blocks, kThreads,
               0, a);
      });
    });
    if (reduce) {
      at::Tensor sum = out;
      at::sum_out(sum, partial);
    }
  });
}

void sigmoid_focal_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& grad, double alpha, double gamma) {
  check_inputs(kBwd, input, target);
  check_on(kBwd, "grad_out", grad_out, input);
  TORCH_CHECK_TYPE(grad_out.is_floating_point(), kBwd, ": grad_out must be a floating-point tensor, got ",
                   grad_out.scalar_type());
  check_shape(kBwd, "grad_out", grad_out, input.sizes());
  TORCH_CHECK_VALUE(grad_out.is_contiguous(), kBwd, ": grad_out must be contiguous, got strides ", grad_out.strides());
  check_like_input(kBwd, "grad", grad, input);
  const int64_t n = input.numel();
  if (n == 0) return;
  // grad_out in the input's dtype is read as is; any other float dtype is read as float32.
  const at::Tensor go = grad_out.scalar_type() == input.scalar_type() ? grad_out : grad_out.to(at::kFloat);

  SfArgs a{};
  a.x = input.data_ptr();
  a.t = target.data_ptr();
  a.go = go.data_ptr();
  a.grad = grad.data_ptr();
  a.n = n;
  a.alpha = static_cast<float>(alpha);
  a.gamma = static_cast<float>(gamma);
  a.vec = aligned16(input) && aligned16(target) && aligned16(go) && aligned16(grad);
  dispatch_float(input.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int blocks = blocks_for(n, Elem<T>::kPerPacket, input.get_device());
    if (go.scalar_type() == input.scalar_type()) {
      launch(input.device(), &sigmoid_focal_bwd_kernel<T, T>, blocks, kThreads, 0, a);
    } else {
      launch(input.device(), &sigmoid_focal_bwd_kernel<T, float>, blocks, kThreads, 0, a);
    }
  });
}

}  // namespace
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("sigmoid_focal_fwd_cuda", TORCH_FN(lossforge::sigmoid_focal_fwd_cuda));
  m.impl("sigmoid_focal_bwd_cuda", TORCH_FN(lossforge::sigmoid_focal_bwd_cuda));
}

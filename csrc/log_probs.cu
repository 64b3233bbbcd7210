// The log-probs family's CUDA ops (contract: ops/log_probs.py's docstring, checked in Python before
// every call; C++ keeps the checks that guard memory): the checks, the launch, and the registration
// for the CUDA key. The kernels, and the traffic designed for, are in log_probs.cuh.

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "host_utils.h"
#include "log_probs.cuh"
#include "row_plan.h"

namespace lossforge {
namespace log_probs {
namespace {

constexpr const char* kFwd = "log_probs_fwd_cuda";
constexpr const char* kBwd = "log_probs_bwd_cuda";

void check_rows(const char* op, const at::Tensor& logits, const at::Tensor& target, double temperature) {
  check_cuda(op, "logits", logits);
  check_kernel_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ", logits.sizes());
  check_unit_inner_stride(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0, op, ": logits must have at least one class, got shape ",
                    logits.sizes());
  check_on(op, "target", target, logits);
  check_dtype(op, "target", target, at::kLong);
  check_shape(op, "target", target, {logits.size(0)});
  TORCH_CHECK_VALUE(target.is_contiguous(), op, ": target must be contiguous, got strides ", target.strides());
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be finite and > 0, got ", temperature);
}

Args make_args(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double temperature) {
  Args a{};
  a.x = logits.data_ptr();
  a.sx = logits.stride(0);
  a.target = target.data_ptr<int64_t>();
  a.rows = logits.size(0);
  a.V = logits.size(1);
  a.ignore = ignore_index;
  a.inv_t = static_cast<float>(1.0 / temperature);
  return a;
}

// One block per row (grid-stride beyond the grid's limit), sized for about four rounds of packets.
template <typename T>
void launch_rows(const at::Tensor& logits, void (*kernel)(Args), const Args& a) {
  const int64_t packets = a.V / Elem<T>::kPerPacket;
  const RowPlan plan = plan_rows(packets, kUnroll, false, device_limits(logits.get_device()));
  launch(logits.device(), kernel, grid_for(a.rows), plan.threads, 0, a);
}

void log_probs_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& out,
                        const at::Tensor& stats, int64_t ignore_index, double temperature) {
  check_rows(kFwd, logits, target, temperature);
  check_f32_rows(kFwd, "out", out, logits, {logits.size(0), 2});
  check_f32_rows(kFwd, "stats", stats, logits, {logits.size(0), 3});
  if (logits.size(0) == 0) return;
  Args a = make_args(logits, target, ignore_index, temperature);
  a.out = out.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  dispatch_float(logits.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T>(logits, &log_probs_fwd_kernel<T>, a);
  });
}

void log_probs_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& stats, const at::Tensor& grad, int64_t ignore_index, double temperature) {
  check_rows(kBwd, logits, target, temperature);
  check_f32_rows(kBwd, "grad_rows", grad_rows, logits, {logits.size(0), 2});
  check_f32_rows(kBwd, "stats", stats, logits, {logits.size(0), 3});
  check_grad_buffer(kBwd, grad, logits);
  if (logits.size(0) == 0) return;
  Args a = make_args(logits, target, ignore_index, temperature);
  a.grad_rows = grad_rows.data_ptr<float>();
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.grad = grad.data_ptr();
  a.sg = grad.stride(0);
  dispatch_float(logits.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T>(logits, &log_probs_bwd_kernel<T>, a);
  });
}

}  // namespace
}  // namespace log_probs
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("log_probs_fwd_cuda", TORCH_FN(lossforge::log_probs::log_probs_fwd_cuda));
  m.impl("log_probs_bwd_cuda", TORCH_FN(lossforge::log_probs::log_probs_bwd_cuda));
}

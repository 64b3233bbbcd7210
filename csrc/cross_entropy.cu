// The cross-entropy family's CUDA ops (contract: ops/cross_entropy.py's docstring, checked in
// Python before every call): the checks that guard memory, the choice of kernel from the dtype and
// options, the row plan, the launch, and the registration for the CUDA key. The kernels are in
// cross_entropy.cuh, compiled one dtype per file in cross_entropy_<dtype>.cu.
// Compile facts (nvcc 13.0, sm_80 + sm_90): no kernels; about 50 s, nearly all of it the ATen and
// dispatcher headers, which is why the kernel files include none.

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cross_entropy.h"
#include "host_utils.h"
#include "row_plan.h"

namespace lossforge {
namespace {

constexpr const char* kFwd = "cross_entropy_fwd_cuda";
constexpr const char* kBwd = "cross_entropy_bwd_cuda";

struct Checked {
  bool soft;
  int64_t rows, C;
};

// The checks shared by the forward and the backward op.
Checked check_rows(const char* op, const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_sum,
                   const std::optional<at::Tensor>& alpha) {
  check_cuda(op, "logits", logits);
  check_kernel_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ", logits.sizes());
  check_unit_inner_stride(op, "logits", logits);
  const int64_t rows = logits.size(0), C = logits.size(1);
  TORCH_CHECK_VALUE(C > 0 || rows == 0, op, ": logits must have at least one class, got shape ", logits.sizes());
  check_on(op, "target", target, logits);
  const bool soft = target.is_floating_point();
  if (soft) {
    check_dtype(op, "target (class probabilities)", target, logits.scalar_type());
    check_shape(op, "target (class probabilities)", target, logits.sizes());
    check_unit_inner_stride(op, "target", target);
  } else {
    check_dtype(op, "target (class indices)", target, at::kLong);
    check_shape(op, "target (class indices)", target, {rows});
    TORCH_CHECK_VALUE(rows <= 1 || target.stride(0) == 1, op, ": target must be contiguous, got stride ",
                      target.strides());
  }
  auto check_class_vector = [&](const char* name, const std::optional<at::Tensor>& vec) {
    if (!vec.has_value()) return;
    check_on(op, name, *vec, logits);
    check_dtype(op, name, *vec, at::kFloat);
    check_shape(op, name, *vec, {C});
    TORCH_CHECK_VALUE(vec->is_contiguous(), op, ": ", name, " must be contiguous, got stride ", vec->strides());
  };
  check_class_vector("weight", weight);
  check_class_vector("alpha", alpha);
  if (weight_sum.has_value()) {
    check_on(op, "weight_sum", *weight_sum, logits);
    check_dtype(op, "weight_sum", *weight_sum, at::kFloat);
    TORCH_CHECK_VALUE(weight_sum->numel() == 1, op, ": weight_sum must hold one value (0-dim), got shape ",
                      weight_sum->sizes());
  }
  return {soft, rows, C};
}

CeArgs make_args(const Checked& ck, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_sum,
                 const std::optional<at::Tensor>& alpha, int64_t ignore_index, double label_smoothing, double z_loss,
                 double softcap, double focal_gamma, double focal_alpha) {
  CeArgs a{};
  a.x = logits.data_ptr();
  a.sx = logits.stride(0);
  if (ck.soft) {
    a.prob = target.data_ptr();
    a.sq = target.stride(0);
  } else {
    a.target = target.data_ptr<int64_t>();
  }
  a.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.weight_sum = weight_sum.has_value() ? weight_sum->data_ptr<float>() : nullptr;
  a.alpha = alpha.has_value() ? alpha->data_ptr<float>() : nullptr;
  a.rows = ck.rows;
  a.C = ck.C;
  a.ignore = ignore_index;
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z = static_cast<float>(z_loss);
  a.cap = static_cast<float>(softcap);
  a.inv_cap = softcap > 0.0 ? static_cast<float>(1.0 / softcap) : 0.f;
  a.gamma = static_cast<float>(focal_gamma);
  a.alpha_f = static_cast<float>(focal_alpha);
  return a;
}

// The kernels the dtype and options need.
const CeKernels& select_kernels(const char* op, const at::Tensor& logits, bool soft, bool weights,
                                double label_smoothing, double softcap) {
  const CeKernels* k = nullptr;
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    k = &ce_kernel_table<decltype(tag)>().select(soft, weights, label_smoothing != 0.0, softcap > 0.0);
  });
  return *k;
}

void cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& weight_sum, const std::optional<at::Tensor>& alpha,
                            const std::optional<at::Tensor>& grad_factor, const at::Tensor& loss,
                            const at::Tensor& stats, const std::optional<at::Tensor>& grad, int64_t ignore_index,
                            double label_smoothing, double z_loss, double softcap, double focal_gamma,
                            double focal_alpha) {
  const Checked ck = check_rows(kFwd, logits, target, weight, weight_sum, alpha);
  TORCH_CHECK_VALUE(grad_factor.has_value() == grad.has_value(), kFwd,
                    ": grad_factor must be given exactly when grad is");
  if (grad_factor.has_value()) check_scalar_f32(kFwd, "grad_factor", *grad_factor, logits);
  check_f32_rows(kFwd, "loss", loss, logits, {ck.rows});
  check_f32_rows(kFwd, "stats", stats, logits, {ck.rows, 4});
  TORCH_CHECK_VALUE(aligned16(stats), kFwd, ": stats must be 16-byte aligned (a row's four values are written at "
                    "once), got address ", stats.data_ptr());
  if (grad.has_value()) check_grad_buffer(kFwd, *grad, logits);
  if (ck.rows == 0) return;

  const CeKernels& k = select_kernels(kFwd, logits, ck.soft, weight.has_value(), label_smoothing, softcap);
  CeArgs a = make_args(ck, logits, target, weight, weight_sum, alpha, ignore_index, label_smoothing, z_loss, softcap,
                       focal_gamma, focal_alpha);
  a.loss = loss.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  if (grad.has_value()) {
    a.scale = grad_factor->data_ptr<float>();
    a.grad = grad->data_ptr();
    a.sg = grad->stride(0);
  }
  const DeviceLimits limits = device_limits(logits.get_device());
  const RowPlan plan = plan_rows(ck.C / k.elems_per_packet, k.unroll, grad.has_value(), limits);
  a.cache_packets = plan.cache_packets;
  a.prefetch_bytes = plan.prefetch_bytes;
  launch(logits.device(), grad.has_value() ? k.fwd_grad : k.fwd, grid_for_rows(plan, ck.rows, limits), plan.threads,
         plan.smem, a);
}

void cross_entropy_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_sum,
                            const std::optional<at::Tensor>& alpha, const at::Tensor& stats, const at::Tensor& grad,
                            int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                            double focal_gamma, double focal_alpha) {
  const Checked ck = check_rows(kBwd, logits, target, weight, weight_sum, alpha);
  check_f32_rows(kBwd, "grad_rows", grad_rows, logits, {ck.rows});
  check_f32_rows(kBwd, "stats", stats, logits, {ck.rows, 4});
  check_grad_buffer(kBwd, grad, logits);
  if (ck.rows == 0) return;

  const CeKernels& k = select_kernels(kBwd, logits, ck.soft, weight.has_value(), label_smoothing, softcap);
  CeArgs a = make_args(ck, logits, target, weight, weight_sum, alpha, ignore_index, label_smoothing, z_loss, softcap,
                       focal_gamma, focal_alpha);
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.scale = grad_rows.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.sg = grad.stride(0);
  const RowPlan plan = plan_rows(ck.C / k.elems_per_packet, k.unroll, false, device_limits(logits.get_device()));
  launch(logits.device(), k.bwd, grid_for(ck.rows), plan.threads, 0, a);
}

}  // namespace
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("cross_entropy_fwd_cuda", TORCH_FN(lossforge::cross_entropy_fwd_cuda));
  m.impl("cross_entropy_bwd_cuda", TORCH_FN(lossforge::cross_entropy_bwd_cuda));
}

// The distillation family's CUDA ops (contract: ops/distillation.py's docstring, checked in Python
// before every call; C++ keeps the checks that guard memory): the checks, the choice of kernel from
// the dtype and divergence, the launch, and the registration for the CUDA key. The kernels, and the
// traffic designed for, are in distillation.cuh.

#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "distillation.cuh"
#include "enums.h"
#include "host_utils.h"
#include "row_plan.h"

namespace lossforge {
namespace distillation {
namespace {

constexpr const char* kFwd = "distillation_fwd_cuda";
constexpr const char* kBwd = "distillation_bwd_cuda";

// The checks shared by the forward and the backward op. One dtype for both heads: the kernels read
// the two rows in the same packets.
void check_rows(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                const std::optional<at::Tensor>& target, int64_t divergence, double beta, double temperature) {
  check_cuda(op, "student", student);
  check_kernel_float(op, "student", student);
  TORCH_CHECK_VALUE(student.dim() == 2, op, ": student must be 2-D (rows, classes), got shape ", student.sizes());
  check_unit_inner_stride(op, "student", student);
  TORCH_CHECK_VALUE(student.size(1) > 0 || student.size(0) == 0, op,
                    ": student must have at least one class, got shape ", student.sizes());
  check_on(op, "teacher", teacher, student);
  check_dtype(op, "teacher", teacher, student.scalar_type());
  check_shape(op, "teacher", teacher, student.sizes());
  check_unit_inner_stride(op, "teacher", teacher);
  if (target.has_value()) {
    check_on(op, "target", *target, student);
    check_dtype(op, "target", *target, at::kLong);
    check_shape(op, "target", *target, {student.size(0)});
    TORCH_CHECK_VALUE(target->is_contiguous(), op, ": target must be contiguous, got strides ", target->strides());
  }
  TORCH_CHECK_VALUE(divergence == kKl || divergence == kReverseKl || divergence == kJsd, op,
                    ": unknown divergence ", divergence);
  TORCH_CHECK_VALUE(divergence != kJsd || (beta > 0.0 && beta < 1.0), op, ": beta must be in (0, 1) for jsd, got ",
                    beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be finite and > 0, got ", temperature);
}

Args make_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
               const at::Tensor& stats, int64_t ignore_index, double beta, double temperature) {
  Args a{};
  a.s = student.data_ptr();
  a.ss = student.stride(0);
  a.t = teacher.data_ptr();
  a.st = teacher.stride(0);
  a.target = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.rows = student.size(0);
  a.V = student.size(1);
  a.ignore = ignore_index;
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.beta = static_cast<float>(beta);
  const bool inside = beta > 0.0 && beta < 1.0;  // only jsd reads the logs
  a.log_beta = inside ? static_cast<float>(std::log(beta)) : 0.f;
  a.log_1mb = inside ? static_cast<float>(std::log1p(-beta)) : 0.f;
  return a;
}

using Kernel = void (*)(Args);

// The kernels of one dtype and divergence.
struct Kernels {
  Kernel fwd, fwd_grad, bwd;
  int elems_per_packet;
};

template <typename T, int kKind>
Kernels kernels_of() {
  return {&distillation_fwd_kernel<T, kKind, false>, &distillation_fwd_kernel<T, kKind, true>,
          &distillation_bwd_kernel<T, kKind>, Elem<T>::kPerPacket};
}

Kernels select_kernels(const char* op, const at::Tensor& student, int64_t divergence) {
  Kernels k{};
  dispatch_float(student.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    k = divergence == kKl ? kernels_of<T, kKl>() : divergence == kReverseKl ? kernels_of<T, kReverseKl>()
                                                                             : kernels_of<T, kJsd>();
  });
  return k;
}

// One block per row (grid-stride beyond the grid's limit), sized for about four rounds of packets.
void launch_rows(const at::Tensor& student, Kernel kernel, int elems_per_packet, const Args& a) {
  const RowPlan plan = plan_rows(a.V / elems_per_packet, kUnroll, false, device_limits(student.get_device()));
  launch(student.device(), kernel, grid_for(a.rows), plan.threads, 0, a);
}

void distillation_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& grad_factor, const at::Tensor& loss, const at::Tensor& stats,
                           const std::optional<at::Tensor>& grad, int64_t divergence, double beta, double temperature,
                           int64_t ignore_index) {
  check_rows(kFwd, student, teacher, target, divergence, beta, temperature);
  TORCH_CHECK_VALUE(grad_factor.has_value() == grad.has_value(), kFwd,
                    ": grad_factor must be given exactly when grad is");
  if (grad_factor.has_value()) check_scalar_f32(kFwd, "grad_factor", *grad_factor, student);
  check_f32_rows(kFwd, "loss", loss, student, {student.size(0)});
  check_f32_rows(kFwd, "stats", stats, student, {student.size(0), 5});
  if (grad.has_value()) check_grad_buffer(kFwd, *grad, student);
  if (student.size(0) == 0) return;
  Args a = make_args(student, teacher, target, stats, ignore_index, beta, temperature);
  a.loss = loss.data_ptr<float>();
  if (grad.has_value()) {
    a.scale = grad_factor->data_ptr<float>();
    a.grad = grad->data_ptr();
    a.sg = grad->stride(0);
  }
  const Kernels k = select_kernels(kFwd, student, divergence);
  launch_rows(student, grad.has_value() ? k.fwd_grad : k.fwd, k.elems_per_packet, a);
}

void distillation_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& target, const at::Tensor& stats, const at::Tensor& grad,
                           int64_t divergence, double beta, double temperature, int64_t ignore_index) {
  check_rows(kBwd, student, teacher, target, divergence, beta, temperature);
  check_f32_rows(kBwd, "grad_rows", grad_rows, student, {student.size(0)});
  check_f32_rows(kBwd, "stats", stats, student, {student.size(0), 5});
  check_grad_buffer(kBwd, grad, student);
  if (student.size(0) == 0) return;
  Args a = make_args(student, teacher, target, stats, ignore_index, beta, temperature);
  a.scale = grad_rows.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.sg = grad.stride(0);
  const Kernels k = select_kernels(kBwd, student, divergence);
  launch_rows(student, k.bwd, k.elems_per_packet, a);
}

}  // namespace
}  // namespace distillation
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("distillation_fwd_cuda", TORCH_FN(lossforge::distillation::distillation_fwd_cuda));
  m.impl("distillation_bwd_cuda", TORCH_FN(lossforge::distillation::distillation_bwd_cuda));
}

// The CUDA implementations of the lossforge kernel ops. Schemas are defined in Python
// (lossforge_kernels/ops/); these signatures follow them argument for argument.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace lossforge {

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& alpha, const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double focal_gamma,
    double focal_alpha);

void cross_entropy_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha, const at::Tensor& stats,
    const at::Tensor& grad, int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    double focal_gamma, double focal_alpha);

at::Tensor sigmoid_focal_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, double grad_scale, const std::optional<at::Tensor>& grad,
    double alpha, double gamma, bool reduce);

void sigmoid_focal_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target, const at::Tensor& grad,
    double alpha, double gamma);

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output, const at::Tensor& applied, bool first);

}  // namespace lossforge

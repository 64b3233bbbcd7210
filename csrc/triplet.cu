// The triplet family's CUDA ops: batch-hard mining, its kept-anchor count and pair gradient, the
// normalisation's row norms and finishing op, and the semi_hard / batch_all row loss (contract:
// ops/triplet.py's docstring, checked in Python before every call; C++
// keeps the checks that guard memory): the checks, the chunk loop of the mining products, the launches, and
// the registration for the CUDA key. The kernels, and the traffic designed for, are in triplet.cuh.
// Last, the register path's ops (ops/triplet.py's second contract block): the pair distances, the list
// gradient, and batch_all's tiles (widths up to 640 bf16/fp16 or 400 fp32 features on an H100).
//
// Mining is one launch of the tiled kernel (anchors resident in shared memory: bf16/fp16 widths up to
// 1664 on an H100, 1152 on an A100; fp32 half those). Wider rows walk the anchors in
// chunks of C rows: cuBLAS makes the chunk's C x B Gram block in fp32 (at::mm with an fp32 output, so
// half-precision products are accumulated and kept in fp32) into one buffer reused by every chunk
// (C * B * 4 bytes under chunks.h's budget rule: 32 MiB for inputs of up to 128 MiB, so it mostly stays
// in L2; never fewer than kMinChunkRows anchors while they fit its cap).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "chunks.h"
#include "host_utils.h"
#include "triplet.cuh"

namespace lossforge {
namespace triplet {
namespace {

constexpr int64_t kMinChunkRows = 256;  // below this the products are bound by re-reading x

constexpr const char* kMine = "triplet_mine_cuda";
constexpr const char* kPairGrad = "triplet_pair_grad_cuda";
constexpr const char* kKept = "triplet_kept_cuda";
constexpr const char* kRowNorms = "triplet_row_norms_cuda";
constexpr const char* kFinish = "triplet_finish_normalised_cuda";
constexpr const char* kSemiHardMine = "triplet_semi_hard_mine_cuda";
constexpr const char* kPairDistances = "triplet_pair_distances_cuda";
constexpr const char* kListGrad = "triplet_list_grad_cuda";
constexpr const char* kBatchAllRows = "triplet_batch_all_rows_cuda";

void check_dense(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                 at::ScalarType dtype) {
  check_on(op, name, t, x);
  check_dtype(op, name, t, dtype);
  check_shape(op, name, t, shape);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t n,
                  at::ScalarType dtype) {
  check_dense(op, name, t, x, {n}, dtype);
}

// The gradient output of the pair and list kernels: like x (fp32 with inv_norm: a partial gradient, which the
// caller completes through the normalisation).
void check_grad_x(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& inv_norm,
                  const at::Tensor& grad_x) {
  check_dense(op, "grad_x", grad_x, x, x.sizes(), inv_norm.has_value() ? at::kFloat : x.scalar_type());
}

void check_rows(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& inv_norm) {
  check_cuda(op, "x", x);
  check_kernel_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ",
                    x.sizes(), " and strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(0) < INT_MAX, op, ": at most ", INT_MAX - 1, " rows, got ", x.size(0));
  if (inv_norm.has_value()) check_vector(op, "inv_norm", *inv_norm, x, x.size(0), at::kFloat);
}

// distance: a Distance value (enums.h); cosine reads inv_norm.
int checked_distance(const char* op, int64_t distance, const std::optional<at::Tensor>& inv_norm) {
  TORCH_CHECK_VALUE(distance == kEuclidean || distance == kSquaredEuclidean || distance == kCosine, op,
                    ": unknown distance ", distance);
  TORCH_CHECK_VALUE(distance != kCosine || inv_norm.has_value(), op, ": cosine distances need inv_norm");
  return static_cast<int>(distance);
}

template <typename F>
void with_kind(int kind, F&& f) {
  switch (kind) {
    case kEuclidean: f(std::integral_constant<int, kEuclidean>{}); break;
    case kSquaredEuclidean: f(std::integral_constant<int, kSquaredEuclidean>{}); break;
    default: f(std::integral_constant<int, kCosine>{}); break;
  }
}

// f(kind, inv_norm flag) as template arguments; cosine always reads inv_norm (checked_distance), so no
// cosine variant without it is compiled.
template <typename F>
void with_distance(int kind, bool has_inv_norm, F&& f) {
  with_kind(kind, [&](auto k) {
    if constexpr (decltype(k)::value == kCosine) {
      f(k, std::true_type{});
    } else {
      with_flag(has_inv_norm, [&](auto s) { f(k, s); });
    }
  });
}

// |x_i|^2, then per row 1 if it holds a NaN or inf (2n fp32 values).
at::Tensor row_sq_norms(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor sq = at::empty({2 * n}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), kMine, [&](auto tag) {
    using T = decltype(tag);
    launch(x.device(), &row_sq_norm_kernel<T>, grid_for((n + kNormRowsPerBlock - 1) / kNormRowsPerBlock),
           kNormRowsPerBlock * kWarpSize, 0, static_cast<const T*>(x.const_data_ptr()), sq.data_ptr<float>(), n, d);
  });
  return sq;
}

// The tiled mining kernel's dynamic shared memory for x, or 0 where its resident anchors do not fit
// (above 1664 bf16/fp16 or 832 fp32 features on an H100).
size_t mine_tiles_smem_for(const at::Tensor& x) {
  const int64_t bytes = mine_tiles_smem(x.size(1), per_word(x));
  const DeviceLimits limits = device_limits(x.device().index());
  return bytes + mine_tiles_static_smem(per_word(x)) + limits.reserved <= limits.optin ? static_cast<size_t>(bytes) : 0;
}

// The widest rows the tiled kernels take on x's device (a multiple of their slab width).
int64_t max_tile_width(const at::Tensor& x) {
  const DeviceLimits limits = device_limits(x.device().index());
  const int64_t room = limits.optin - limits.reserved - mine_tiles_static_smem(per_word(x));
  return std::max<int64_t>(0, (room / (kMineTileRows * 4) - 4) / kTileWords * kTileWords * per_word(x));
}

// The widest rows batch_all's tiles take on x's device (a multiple of 16).
int64_t max_batch_all_width(const at::Tensor& x) {
  const DeviceLimits limits = device_limits(x.device().index());
  const int64_t room = limits.optin - limits.reserved - batch_all_static_smem(per_word(x));
  int64_t d = 0;  // batch_all_tiles_smem grows with d: the largest multiple of 16 that fits
  while (batch_all_tiles_smem(d + 16, per_word(x)) <= room) d += 16;
  return d;
}

void triplet_kept_cuda(const at::Tensor& labels, const at::Tensor& kept) {
  check_cuda(kKept, "labels", labels);
  TORCH_CHECK_VALUE(labels.dim() == 1, kKept, ": labels must be 1-D, got shape ", labels.sizes());
  const int64_t n = labels.size(0);
  check_vector(kKept, "labels", labels, labels, n, at::kLong);
  check_vector(kKept, "kept", kept, labels, n, at::kFloat);
  if (n == 0) return;
  launch(labels.device(), &triplet_kept_kernel, grid_for((n + kKeptThreads - 1) / kKeptThreads), kKeptThreads, 0,
         labels.const_data_ptr<int64_t>(), kept.data_ptr<float>(), n);
}

void triplet_row_norms_cuda(const at::Tensor& x, bool twice, const at::Tensor& inv_norm, const at::Tensor& radial) {
  check_rows(kRowNorms, x, inv_norm);
  const int64_t n = x.size(0), d = x.size(1);
  check_vector(kRowNorms, "radial", radial, x, n, at::kFloat);
  if (n == 0) return;
  dispatch_float(x.scalar_type(), kRowNorms, [&](auto tag) {
    using T = decltype(tag);
    with_flag(twice, [&](auto t) {
      launch(x.device(), &row_norms_kernel<T, decltype(t)::value>,
             grid_for((n + kNormRowsPerBlock - 1) / kNormRowsPerBlock), kNormRowsPerBlock * kWarpSize, 0,
             static_cast<const T*>(x.const_data_ptr()), inv_norm.data_ptr<float>(), radial.data_ptr<float>(), n, d);
    });
  });
}

void triplet_finish_normalised_cuda(const at::Tensor& partial, const at::Tensor& x, const at::Tensor& radial,
                                    const at::Tensor& grad_x) {
  check_rows(kFinish, x, std::nullopt);
  const int64_t n = x.size(0), d = x.size(1);
  check_dense(kFinish, "partial", partial, x, x.sizes(), at::kFloat);
  check_vector(kFinish, "radial", radial, x, n, at::kFloat);
  check_dense(kFinish, "grad_x", grad_x, x, x.sizes(), x.scalar_type());
  if (n == 0 || d == 0) return;
  dispatch_float(x.scalar_type(), kFinish, [&](auto tag) {
    using T = decltype(tag);
    launch(x.device(), &finish_normalised_kernel<T>, grid_for(n), kFinishThreads, 0, partial.const_data_ptr<float>(),
           static_cast<const T*>(x.const_data_ptr()), radial.const_data_ptr<float>(),
           static_cast<T*>(grad_x.data_ptr()), n, d);
  });
}

void triplet_mine_cuda(const at::Tensor& x, const at::Tensor& labels, const std::optional<at::Tensor>& inv_norm,
                       int64_t distance, double margin, bool soft_margin, const at::Tensor& pos_index,
                       const at::Tensor& pos_dist, const at::Tensor& neg_index, const at::Tensor& neg_dist,
                       const at::Tensor& loss, const at::Tensor& slope, const std::optional<at::Tensor>& kept) {
  check_rows(kMine, x, inv_norm);
  const int64_t n = x.size(0);
  check_vector(kMine, "labels", labels, x, n, at::kLong);
  check_vector(kMine, "pos_index", pos_index, x, n, at::kLong);
  check_vector(kMine, "pos_dist", pos_dist, x, n, at::kFloat);
  check_vector(kMine, "neg_index", neg_index, x, n, at::kLong);
  check_vector(kMine, "neg_dist", neg_dist, x, n, at::kFloat);
  check_vector(kMine, "loss", loss, x, n, at::kFloat);
  check_vector(kMine, "slope", slope, x, n, at::kFloat);
  if (kept.has_value()) check_vector(kMine, "kept", *kept, x, n, at::kFloat);
  const int kind = checked_distance(kMine, distance, inv_norm);
  if (n == 0) return;

  const at::Tensor sq = row_sq_norms(x);
  MineArgs a{};
  a.x = x.const_data_ptr();
  a.labels = labels.const_data_ptr<int64_t>();
  a.sq = sq.const_data_ptr<float>();
  a.inv_norm = inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr;
  a.pos_index = pos_index.data_ptr<int64_t>();
  a.pos_dist = pos_dist.data_ptr<float>();
  a.neg_index = neg_index.data_ptr<int64_t>();
  a.neg_dist = neg_dist.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.slope = slope.data_ptr<float>();
  a.kept = kept.has_value() ? kept->data_ptr<float>() : nullptr;
  a.n = n;
  a.d = x.size(1);
  a.margin = static_cast<float>(margin);
  a.row0 = 0;
  a.rows = n;
  // Every variant of a mining kernel, by the call's distance, inv_norm and soft margin.
  auto each_variant = [&](auto tag, auto&& run) {
    with_distance(kind, inv_norm.has_value(), [&](auto k, auto s) {
      with_flag(soft_margin, [&](auto soft) { run(tag, k, s, soft); });
    });
  };
  const size_t tiles_smem = mine_tiles_smem_for(x);
  if (tiles_smem > 0) {  // within the shared-memory limit: one launch, no Gram block
    a.vec = packet_rows(x);
    auto run = [&](auto tag, auto k, auto s, auto soft) {
      launch(x.device(),
             &triplet_mine_tiles_kernel<decltype(tag), decltype(k)::value, decltype(s)::value, decltype(soft)::value>,
             grid_for((n + kMineTileRows - 1) / kMineTileRows), kMineTileThreads, tiles_smem, a);
    };
    dispatch_float(x.scalar_type(), kMine, [&](auto tag) { each_variant(tag, run); });
    return;
  }
  const int64_t chunk = chunks::chunk_rows(n, 4 * n, 0, static_cast<int64_t>(x.nbytes()), 1, kMinChunkRows);
  at::Tensor gram = at::empty({chunk, n}, x.options().dtype(at::kFloat));
  const at::Tensor xt = x.t();
  for (int64_t row0 = 0; row0 < n; row0 += chunk) {
    const int64_t rows = std::min(chunk, n - row0);
    at::Tensor block = gram.narrow(0, 0, rows);
    const at::Tensor part = x.narrow(0, row0, rows);
    product_fp32_out(part, xt, block);  // fp32 output: no rounding of the dot products
    a.gram = block.const_data_ptr<float>();
    a.row0 = row0;
    a.rows = rows;
    dispatch_float(x.scalar_type(), kMine, [&](auto tag) {
      each_variant(tag, [&](auto t, auto k, auto s, auto soft) {
        launch(x.device(),
               &triplet_mine_kernel<decltype(t), decltype(k)::value, decltype(s)::value, decltype(soft)::value>,
               grid_for((rows + kMineRows - 1) / kMineRows), kMineThreads, 0, a);
      });
    });
  }
}

// What the tiled kernels read of x, with sq = row_sq_norms(x).
TileMineInputs tile_inputs(const at::Tensor& x, const at::Tensor& labels, const std::optional<at::Tensor>& inv_norm,
                           const at::Tensor& sq) {
  return TileMineInputs{x.const_data_ptr(), labels.const_data_ptr<int64_t>(), sq.const_data_ptr<float>(),
                        inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr, x.size(0), x.size(1),
                        packet_rows(x)};
}

void triplet_semi_hard_mine_cuda(const at::Tensor& x, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& inv_norm, int64_t distance, const at::Tensor& n_pos,
                                 const at::Tensor& pos_dist, const at::Tensor& chosen, const at::Tensor& chosen_dist) {
  check_rows(kSemiHardMine, x, inv_norm);
  const int64_t n = x.size(0);
  check_vector(kSemiHardMine, "labels", labels, x, n, at::kLong);
  check_vector(kSemiHardMine, "n_pos", n_pos, x, n, at::kLong);
  check_dense(kSemiHardMine, "pos_dist", pos_dist, x, {n, kPosSlots}, at::kFloat);
  check_dense(kSemiHardMine, "chosen", chosen, x, {n, kPosSlots}, at::kLong);
  check_dense(kSemiHardMine, "chosen_dist", chosen_dist, x, {n, kPosSlots}, at::kFloat);
  const int kind = checked_distance(kSemiHardMine, distance, inv_norm);
  const size_t smem = mine_tiles_smem_for(x);
  TORCH_CHECK_VALUE(smem > 0, kSemiHardMine, ": x must have at most ", max_tile_width(x), " features of ",
                    x.scalar_type(), " on this device (the anchors stay in shared memory), got ", x.size(1));
  if (n == 0) return;
  const at::Tensor sq = row_sq_norms(x);
  SemiHardArgs a{};
  a.in = tile_inputs(x, labels, inv_norm, sq);
  a.n_pos = n_pos.const_data_ptr<int64_t>();
  a.pos_dist = pos_dist.const_data_ptr<float>();
  a.chosen = chosen.data_ptr<int64_t>();
  a.chosen_dist = chosen_dist.data_ptr<float>();
  auto run = [&](auto tag) {
    with_distance(kind, inv_norm.has_value(), [&](auto k, auto s) {
      launch(x.device(), &triplet_semi_hard_tiles_kernel<decltype(tag), decltype(k)::value, decltype(s)::value>,
             grid_for((n + kMineTileRows - 1) / kMineTileRows), kMineTileThreads, smem, a);
    });
  };
  dispatch_float(x.scalar_type(), kSemiHardMine, run);
}

// batch_all's tiles' dynamic shared memory for x, or 0 where they do not take x (too wide).
size_t batch_all_smem_for(const at::Tensor& x) {
  const int64_t bytes = batch_all_tiles_smem(x.size(1), per_word(x));
  const DeviceLimits limits = device_limits(x.device().index());
  const int64_t fixed = batch_all_static_smem(per_word(x));
  return bytes + fixed + limits.reserved <= limits.optin ? static_cast<size_t>(bytes) : 0;
}

void triplet_batch_all_rows_cuda(const at::Tensor& x, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& inv_norm, int64_t distance, double margin,
                                 bool soft_margin, const at::Tensor& n_pos, const at::Tensor& pos_dist,
                                 const std::optional<at::Tensor>& row_weight, const at::Tensor& loss,
                                 const at::Tensor& count, const at::Tensor& pos_slope,
                                 const std::optional<at::Tensor>& grad_rows) {
  check_rows(kBatchAllRows, x, inv_norm);
  const int64_t n = x.size(0);
  check_vector(kBatchAllRows, "labels", labels, x, n, at::kLong);
  check_vector(kBatchAllRows, "n_pos", n_pos, x, n, at::kLong);
  check_dense(kBatchAllRows, "pos_dist", pos_dist, x, {n, kPosSlots}, at::kFloat);
  check_vector(kBatchAllRows, "loss", loss, x, n, at::kFloat);
  check_vector(kBatchAllRows, "count", count, x, n, at::kLong);
  check_dense(kBatchAllRows, "pos_slope", pos_slope, x, {n, kPosSlots}, at::kFloat);
  TORCH_CHECK_VALUE(row_weight.has_value() == grad_rows.has_value(), kBatchAllRows,
                    ": row_weight and grad_rows come together");
  if (row_weight.has_value()) {
    check_vector(kBatchAllRows, "row_weight", *row_weight, x, n, at::kFloat);
    check_dense(kBatchAllRows, "grad_rows", *grad_rows, x, x.sizes(), at::kFloat);
  }
  const int kind = checked_distance(kBatchAllRows, distance, inv_norm);
  const size_t smem = batch_all_smem_for(x);
  TORCH_CHECK_VALUE(smem > 0, kBatchAllRows, ": x must have at most ", max_batch_all_width(x), " features (",
                    x.scalar_type(), ") on this device (the anchors, a tile and the gradient stay in shared memory), "
                    "got ", x.size(1));
  if (n == 0) return;
  const at::Tensor sq = row_sq_norms(x);
  BatchAllArgs a{};
  a.in = tile_inputs(x, labels, inv_norm, sq);
  a.n_pos = n_pos.const_data_ptr<int64_t>();
  a.pos_dist = pos_dist.const_data_ptr<float>();
  a.row_weight = row_weight.has_value() ? row_weight->const_data_ptr<float>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.count = count.data_ptr<int64_t>();
  a.pos_slope = pos_slope.data_ptr<float>();
  a.grad_rows = grad_rows.has_value() ? grad_rows->data_ptr<float>() : nullptr;
  a.margin = static_cast<float>(margin);
  a.acc_stride = static_cast<int>(batch_all_acc_stride(x.size(1)));
  a.soft = soft_margin;
  dispatch_float(x.scalar_type(), kBatchAllRows, [&](auto tag) {
    with_kind(kind, [&](auto k) {
      launch(x.device(), &triplet_batch_all_tiles_kernel<decltype(tag), decltype(k)::value>,
             grid_for((n + kAllRows - 1) / kAllRows), kAllThreads, smem, a);
    });
  });
}

void triplet_pair_grad_cuda(const at::Tensor& x, const std::optional<at::Tensor>& inv_norm,
                            const at::Tensor& pos_index, const at::Tensor& pos_dist, const at::Tensor& neg_index,
                            const at::Tensor& neg_dist, const at::Tensor& slope, const at::Tensor& weight,
                            int64_t distance, const at::Tensor& grad_x) {
  check_rows(kPairGrad, x, inv_norm);
  const int64_t n = x.size(0);
  const int kind = checked_distance(kPairGrad, distance, inv_norm);
  check_vector(kPairGrad, "pos_index", pos_index, x, n, at::kLong);
  check_vector(kPairGrad, "pos_dist", pos_dist, x, n, at::kFloat);
  check_vector(kPairGrad, "neg_index", neg_index, x, n, at::kLong);
  check_vector(kPairGrad, "neg_dist", neg_dist, x, n, at::kFloat);
  check_vector(kPairGrad, "slope", slope, x, n, at::kFloat);
  TORCH_CHECK_VALUE(weight.dim() <= 1, kPairGrad, ": weight must be 0-dim or (B,), got shape ", weight.sizes());
  check_vector(kPairGrad, "weight", weight.reshape({-1}), x, weight.dim() == 0 ? 1 : n, at::kFloat);
  check_grad_x(kPairGrad, x, inv_norm, grad_x);
  if (n == 0 || x.size(1) == 0) return;

  const int64_t slices = (x.size(1) + kGradThreads - 1) / kGradThreads;
  PairGradArgs a{};
  a.x = x.const_data_ptr();
  a.inv_norm = inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr;
  a.pos_index = pos_index.const_data_ptr<int64_t>();
  a.pos_dist = pos_dist.const_data_ptr<float>();
  a.neg_index = neg_index.const_data_ptr<int64_t>();
  a.neg_dist = neg_dist.const_data_ptr<float>();
  a.slope = slope.const_data_ptr<float>();
  a.weight = weight.const_data_ptr<float>();
  a.weight_step = weight.dim() == 0 ? 0 : 1;
  a.grad_x = grad_x.data_ptr();
  a.n = n;
  a.d = x.size(1);
  TORCH_CHECK_VALUE(slices < 65536, kPairGrad, ": at most ", 65535 * kGradThreads, " features, got ", a.d);
  const dim3 grid(grid_for((n + kGradRows - 1) / kGradRows), static_cast<unsigned int>(slices));
  dispatch_float(x.scalar_type(), kPairGrad, [&](auto tag) {
    using T = decltype(tag);
    with_distance(kind, inv_norm.has_value(), [&](auto k, auto s) {
      launch(x.device(), &triplet_pair_grad_kernel<T, decltype(k)::value, decltype(s)::value>, grid, kGradThreads,
             0, a);
    });
  });
}

constexpr const char* kRowLoss = "triplet_row_loss_cuda";

void triplet_row_loss_cuda(const at::Tensor& gram, const at::Tensor& sq, const std::optional<at::Tensor>& inv_norm,
                           const at::Tensor& labels, int64_t row0, int64_t mining, int64_t distance,
                           double margin, bool soft_margin, const std::optional<at::Tensor>& row_weight,
                           const at::Tensor& loss, const at::Tensor& count, const std::optional<at::Tensor>& coef) {
  check_cuda(kRowLoss, "gram", gram);
  check_dtype(kRowLoss, "gram", gram, at::kFloat);
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.is_contiguous(), kRowLoss, ": gram must be a contiguous 2-D tensor, got "
                    "shape ", gram.sizes(), " and strides ", gram.strides());
  const int64_t rows = gram.size(0), n = gram.size(1);
  TORCH_CHECK_VALUE(n < INT_MAX, kRowLoss, ": at most ", INT_MAX - 1, " columns, got ", n);
  TORCH_CHECK_VALUE(row0 >= 0 && row0 + rows <= n, kRowLoss, ": row0 must be in [0, ", n - rows, "], got ", row0);
  check_vector(kRowLoss, "sq", sq, gram, n, at::kFloat);
  if (inv_norm.has_value()) check_vector(kRowLoss, "inv_norm", *inv_norm, gram, n, at::kFloat);
  check_vector(kRowLoss, "labels", labels, gram, n, at::kLong);
  check_vector(kRowLoss, "loss", loss, gram, rows, at::kFloat);
  check_vector(kRowLoss, "count", count, gram, rows, at::kLong);
  TORCH_CHECK_VALUE(row_weight.has_value() == coef.has_value(), kRowLoss, ": row_weight and coef come together");
  if (coef.has_value()) {
    check_vector(kRowLoss, "row_weight", *row_weight, gram, rows, at::kFloat);
    check_on(kRowLoss, "coef", *coef, gram);
    check_dtype(kRowLoss, "coef", *coef, at::kFloat);
    check_shape(kRowLoss, "coef", *coef, gram.sizes());
    TORCH_CHECK_VALUE(coef->is_contiguous(), kRowLoss, ": coef must be contiguous");
  }
  TORCH_CHECK_VALUE(mining == kSemiHard || mining == kBatchAll, kRowLoss, ": unknown mining ", mining);
  const int kind = checked_distance(kRowLoss, distance, inv_norm);
  if (rows == 0) return;

  RowLossArgs a{};
  a.gram = gram.const_data_ptr<float>();
  a.sq = sq.const_data_ptr<float>();
  a.inv_norm = inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr;
  a.labels = labels.const_data_ptr<int64_t>();
  a.row_weight = row_weight.has_value() ? row_weight->const_data_ptr<float>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.count = count.data_ptr<int64_t>();
  a.coef = coef.has_value() ? coef->data_ptr<float>() : nullptr;
  a.n = n;
  a.row0 = row0;
  a.margin = static_cast<float>(margin);
  with_distance(kind, inv_norm.has_value(), [&](auto k, auto s) {
    with_flag(mining == kSemiHard, [&](auto semi) {
      with_flag(soft_margin, [&](auto soft) {
        with_flag(coef.has_value(), [&](auto grad) {
          launch(gram.device(),
                 &triplet_row_loss_kernel<decltype(k)::value, decltype(s)::value, decltype(semi)::value,
                                          decltype(soft)::value, decltype(grad)::value>,
                 grid_for(rows), kRowThreads, 0, a);
        });
      });
    });
  });
}

// ---- the register path's pair distances and list gradient ----

void triplet_pair_distances_cuda(const at::Tensor& x, const std::optional<at::Tensor>& inv_norm,
                                 const at::Tensor& first, const at::Tensor& second, int64_t distance,
                                 const at::Tensor& gram, const at::Tensor& exact) {
  check_rows(kPairDistances, x, inv_norm);
  const int kind = checked_distance(kPairDistances, distance, inv_norm);
  check_dense(kPairDistances, "first", first, x, first.sizes(), at::kLong);
  check_dense(kPairDistances, "second", second, x, first.sizes(), at::kLong);
  check_dense(kPairDistances, "gram", gram, x, first.sizes(), at::kFloat);
  check_dense(kPairDistances, "exact", exact, x, first.sizes(), at::kFloat);
  const int64_t entries = first.numel();
  if (entries == 0) return;

  PairDistanceArgs a{};
  a.x = x.const_data_ptr();
  a.inv_norm = inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr;
  a.first = first.const_data_ptr<int64_t>();
  a.second = second.const_data_ptr<int64_t>();
  a.gram = gram.data_ptr<float>();
  a.exact = exact.data_ptr<float>();
  a.entries = entries;
  a.d = x.size(1);
  dispatch_float(x.scalar_type(), kPairDistances, [&](auto tag) {
    using T = decltype(tag);
    with_distance(kind, inv_norm.has_value(), [&](auto k, auto s) {
      launch(x.device(), &triplet_pair_distances_kernel<T, decltype(k)::value, decltype(s)::value>,
             grid_for((entries + kPairWarps - 1) / kPairWarps), kPairWarps * kWarpSize, 0, a);
    });
  });
}

// offsets' values (they index others) are checked in Python where they may be read without a sync.
void triplet_list_grad_cuda(const at::Tensor& x, const std::optional<at::Tensor>& inv_norm,
                            const std::optional<at::Tensor>& grad_rows, const at::Tensor& offsets,
                            const at::Tensor& others, const at::Tensor& coef, bool centered,
                            const at::Tensor& grad_x) {
  check_rows(kListGrad, x, inv_norm);
  const int64_t n = x.size(0);
  if (grad_rows.has_value()) check_dense(kListGrad, "grad_rows", *grad_rows, x, x.sizes(), at::kFloat);
  check_vector(kListGrad, "offsets", offsets, x, n + 1, at::kLong);
  TORCH_CHECK_VALUE(others.dim() == 1, kListGrad, ": others must be 1-D, got shape ", others.sizes());
  check_dense(kListGrad, "others", others, x, others.sizes(), at::kLong);
  check_dense(kListGrad, "coef", coef, x, others.sizes(), at::kFloat);
  check_grad_x(kListGrad, x, inv_norm, grad_x);
  if (n == 0 || x.size(1) == 0) return;

  ListGradArgs a{};
  a.x = x.const_data_ptr();
  a.inv_norm = inv_norm.has_value() ? inv_norm->const_data_ptr<float>() : nullptr;
  a.grad_rows = grad_rows.has_value() ? grad_rows->const_data_ptr<float>() : nullptr;
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.others = others.const_data_ptr<int64_t>();
  a.coef = coef.const_data_ptr<float>();
  a.grad_x = grad_x.data_ptr();
  a.n = n;
  a.d = x.size(1);
  dispatch_float(x.scalar_type(), kListGrad, [&](auto tag) {
    using T = decltype(tag);
    with_flag(inv_norm.has_value(), [&](auto s) {
      with_flag(centered, [&](auto c) {
        launch(x.device(), &triplet_list_grad_kernel<T, decltype(s)::value, decltype(c)::value>,
               grid_for((n + kListRows - 1) / kListRows), kListRows * kWarpSize, 0, a);
      });
    });
  });
}

}  // namespace
}  // namespace triplet
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("triplet_kept_cuda", TORCH_FN(lossforge::triplet::triplet_kept_cuda));
  m.impl("triplet_row_norms_cuda", TORCH_FN(lossforge::triplet::triplet_row_norms_cuda));
  m.impl("triplet_finish_normalised_cuda", TORCH_FN(lossforge::triplet::triplet_finish_normalised_cuda));
  m.impl("triplet_mine_cuda", TORCH_FN(lossforge::triplet::triplet_mine_cuda));
  m.impl("triplet_semi_hard_mine_cuda", TORCH_FN(lossforge::triplet::triplet_semi_hard_mine_cuda));
  m.impl("triplet_pair_grad_cuda", TORCH_FN(lossforge::triplet::triplet_pair_grad_cuda));
  m.impl("triplet_row_loss_cuda", TORCH_FN(lossforge::triplet::triplet_row_loss_cuda));
  m.impl("triplet_pair_distances_cuda", TORCH_FN(lossforge::triplet::triplet_pair_distances_cuda));
  m.impl("triplet_list_grad_cuda", TORCH_FN(lossforge::triplet::triplet_list_grad_cuda));
  m.impl("triplet_batch_all_rows_cuda", TORCH_FN(lossforge::triplet::triplet_batch_all_rows_cuda));
}

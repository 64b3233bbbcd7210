// The contrastive family's CUDA ops: InfoNCE / CLIP, SupCon and SigLIP (contract: ops/contrastive.py's
// docstring, checked in Python before every call; C++ keeps the checks that guard memory): the
// checks, the chunk loops with their similarity and gradient products, the launches, and the
// registration for the CUDA key. The kernels, and the work and traffic designed for, are in
// contrastive.cuh.
//
// Every dtype runs on tensor-core tiles (fp32 as three tf32 products, csrc/mma.cuh): the forward in
// tiled_forward (the inverse norms, one tile_stats_kernel launch, and for symmetric InfoNCE the average
// of row and column losses), each backward pass in tiled_gradient_pass (one tile_grad_kernel launch);
// a backward pass whose gradient accumulator does not fit the device's shared memory takes the chunks.
// The chunked pass walks the rows in chunks (rows_per_chunk: chunks.h's budget rule, 32 MiB of fp32,
// or up to a quarter of the inputs' bytes for large inputs), so the (B, M) similarity matrix never
// exists.
// grad_query walks chunks of query rows; grad_key walks chunks of key rows on S^T = k_c @ q^T (a
// fifth product, so that no fp32 (M, D) accumulator is needed).
//
// The chunked pass's products go through at::mm_out (its out_dtype overload for half inputs): torch's
// cuBLAS handle, stream and workspace, and torch's matmul precision setting for fp32 inputs.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "chunks.h"
#include "contrastive.cuh"
#include "host_utils.h"

namespace lossforge {
namespace contrastive {
namespace {

// ---- the chunk products, through torch's matrix product (cuBLAS on the current stream) ----

// sim (rows, n) = x (rows, d) . y (n, d)^T
void similarities(const at::Tensor& x, const at::Tensor& y, at::Tensor sim) { product_fp32_out(x, y.t(), sim); }

// acc (rows, d) = g (rows, n) . y (n, d)
void gradient_product(const at::Tensor& g, const at::Tensor& y, at::Tensor acc) { product_fp32_out(g, y, acc); }

// ---- checks, chunk loops and launches ----

constexpr const char* kFwd = "contrastive_fwd_cuda";
constexpr const char* kBwd = "contrastive_bwd_cuda";

// Rows per chunk: an fp32 (rows, max(n, d)) buffer under chunks.h's budget for inputs `a` and `b` (one
// tensor counted once, as SupCon's key is its query).
int64_t rows_per_chunk(int64_t total, int64_t n, int64_t d, const at::Tensor& a, const at::Tensor& b) {
  const int64_t width = std::max<int64_t>({n, d, 1});
  const int64_t input_bytes = static_cast<int64_t>(a.nbytes() + (b.is_same(a) ? 0 : b.nbytes()));
  return chunks::chunk_rows(total, static_cast<int64_t>(sizeof(float)) * width, 0, input_bytes);
}

// The chunk walk both passes share: for each chunk of `chunk` rows of x, S_c = x_c y^T into sim's first
// rows, then each(row0, rows) launches what reads it.
template <class Each>
void for_each_similarity_chunk(const at::Tensor& x, const at::Tensor& y, const at::Tensor& sim, int64_t chunk,
                               Each&& each) {
  const int64_t total = x.size(0);
  for (int64_t r0 = 0; r0 < total; r0 += chunk) {
    const int64_t rows = std::min(chunk, total - r0);
    similarities(x.narrow(0, r0, rows), y, sim.narrow(0, 0, rows));
    each(r0, rows);
  }
}

unsigned int warp_rows_grid(int64_t rows) {
  return grid_for(std::max<int64_t>(1, (rows + kThreads / kWarpSize - 1) / (kThreads / kWarpSize)));
}

// The checks that guard memory, shared by both ops.
void check_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                  const std::optional<at::Tensor>& labels, const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                  int64_t kind, bool symmetric) {
  check_cuda(op, "query", query);
  check_kernel_float(op, "query", query);
  TORCH_CHECK_VALUE(query.dim() == 2 && query.is_contiguous(), op,
                    ": query must be a contiguous 2-D tensor, got shape ", query.sizes(), " and strides ",
                    query.strides());
  check_on(op, "key", key, query);
  check_dtype(op, "key", key, query.scalar_type());
  TORCH_CHECK_VALUE(key.dim() == 2 && key.is_contiguous() && key.size(1) == query.size(1), op,
                    ": key must be a contiguous 2-D tensor as wide as query, got shape ", key.sizes());
  TORCH_CHECK_VALUE(key.size(0) >= query.size(0), op, ": key needs at least as many rows as query (",
                    query.size(0), "), got ", key.size(0));
  TORCH_CHECK_VALUE(kind == kInfoNce || kind == kSupCon || kind == kSigLip, op, ": unknown kind ", kind);
  if (kind == kSupCon) {
    TORCH_CHECK_VALUE(key.size(0) == query.size(0), op, ": kind SUPCON takes key = query");
    TORCH_CHECK_VALUE(labels.has_value(), op, ": kind SUPCON needs labels");
    check_on(op, "labels", *labels, query);
    check_dtype(op, "labels", *labels, at::kLong);
    check_shape(op, "labels", *labels, {query.size(0)});
    TORCH_CHECK_VALUE(labels->is_contiguous(), op, ": labels must be contiguous, got strides ", labels->strides());
  }
  TORCH_CHECK_VALUE(!symmetric || key.size(0) == query.size(0), op, ": symmetric needs as many keys as queries");
  check_scalar_f32(op, "logit_scale", logit_scale, query);
  check_scalar_f32(op, "logit_bias", logit_bias, query);
}

template <typename F>
void with_kind(int64_t kind, F&& f) {
  switch (kind) {
    case kInfoNce: f(std::integral_constant<int, kInfoNce>{}); break;
    case kSupCon: f(std::integral_constant<int, kSupCon>{}); break;
    default: f(std::integral_constant<int, kSigLip>{}); break;
  }
}

// r (and r^2 where unclamped, when proj is wanted) of each row of x.
void inverse_norms(const at::Tensor& x, float* inv, float* proj) {
  dispatch_float(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    launch(x.device(), &inv_norm_kernel<T>, warp_rows_grid(x.size(0)), kThreads, 0,
           static_cast<const T*>(x.data_ptr()), x.size(0), x.size(1), inv, proj);
  });
}

// The forward on tile_stats_kernel (every dtype): no similarity chunk, one launch (plus the
// symmetric average).
void tiled_forward(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& labels,
                   const at::Tensor& logit_scale, const at::Tensor& logit_bias, const at::Tensor& loss,
                   const at::Tensor& stats, int64_t kind, bool symmetric, const float* inv_q, const float* inv_k) {
  const int64_t B = query.size(0), M = key.size(0);
  float* const stats0 = stats.data_ptr<float>();
  float* const stats1 = stats0 + B;
  at::Tensor col_loss = symmetric ? at::empty({B}, query.options().dtype(at::kFloat)) : at::Tensor();
  TileFwd f{};
  f.pass[0] = TilePass{query.data_ptr(), key.data_ptr(), B, M, inv_q, inv_k, loss.data_ptr<float>(), stats0, stats1};
  if (symmetric) {
    f.pass[1] = TilePass{key.data_ptr(), query.data_ptr(), M, B, inv_k, inv_q, col_loss.data_ptr<float>(), stats1,
                         nullptr};
  }
  const int64_t row_blocks = (B + kTileRows - 1) / kTileRows;
  const int64_t col_blocks = symmetric ? (M + kTileRows - 1) / kTileRows : 0;
  f.first_blocks = row_blocks;
  f.d = query.size(1);
  f.logit_scale = logit_scale.data_ptr<float>();
  f.logit_bias = logit_bias.data_ptr<float>();
  f.labels = kind == kSupCon ? labels->data_ptr<int64_t>() : nullptr;
  f.vec = packet_rows(query) && packet_rows(key);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    with_kind(kind, [&](auto kind_tag) {
      with_flag(inv_q != nullptr, [&](auto norm_tag) {
        constexpr int kKind = decltype(kind_tag)::value;
        constexpr bool kNorm = decltype(norm_tag)::value;
        launch(query.device(), &tile_stats_kernel<T, kKind, kNorm>, grid_for(row_blocks + col_blocks), kTileThreads,
               0, f);
      });
    });
  };
  dispatch_float(query.scalar_type(), kFwd, run);
  if (symmetric) {
    launch(query.device(), &finish_symmetric_tiles_kernel, grid_for((B + kThreads - 1) / kThreads), kThreads, 0, B,
           static_cast<const float*>(col_loss.data_ptr<float>()), loss.data_ptr<float>());
  }
}

void contrastive_fwd_cuda(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& labels,
                          const at::Tensor& logit_scale, const at::Tensor& logit_bias, const at::Tensor& loss,
                          const at::Tensor& stats, int64_t kind, bool normalize, bool symmetric) {
  check_inputs(kFwd, query, key, labels, logit_scale, logit_bias, kind, symmetric);
  const int64_t B = query.size(0), M = key.size(0);
  check_f32_rows(kFwd, "loss", loss, query, {B});
  check_f32_rows(kFwd, "stats", stats, query, {2, B});
  if (B == 0) return;
  symmetric = symmetric && kind == kInfoNce;
  const c10::cuda::CUDAGuard guard(query.device());
  const auto f32 = query.options().dtype(at::kFloat);

  at::Tensor inv_q, inv_k;
  if (normalize) {
    inv_q = at::empty({B}, f32);
    inverse_norms(query, inv_q.data_ptr<float>(), nullptr);
    inv_k = inv_q;
    if (kind != kSupCon) {
      inv_k = at::empty({M}, f32);
      inverse_norms(key, inv_k.data_ptr<float>(), nullptr);
    }
  }
  tiled_forward(query, key, labels, logit_scale, logit_bias, loss, stats, kind, symmetric,
                normalize ? inv_q.data_ptr<float>() : nullptr, normalize ? inv_k.data_ptr<float>() : nullptr);
}

// One side of the backward: the rows whose gradient a pass produces (own) or sums over (other).
struct Side {
  const at::Tensor* x;
  const float* inv;   // null without `normalize`
  const float* proj;
};

// Calls f with the template flags of a pass (dtype T, kind, normalize, roles) for the role
// combinations the ops use (SupCon both, SigLIP one, InfoNCE one or both); the others are never
// instantiated.
template <typename F>
void with_pass_flags(int64_t kind, bool normalize, bool has_own, bool has_other, F&& f) {
  with_kind(kind, [&](auto kind_tag) {
    with_flag(normalize, [&](auto norm_tag) {
      with_flag(has_own, [&](auto own_tag) {
        with_flag(has_other, [&](auto other_tag) {
          constexpr int kKind = decltype(kind_tag)::value;
          constexpr bool kOwn = decltype(own_tag)::value, kOther = decltype(other_tag)::value;
          constexpr bool kUsed = kKind == kSupCon ? kOwn && kOther : kKind == kSigLip ? kOwn != kOther : kOwn || kOther;
          if constexpr (kUsed) {
            f(std::integral_constant<int, kKind>{}, norm_tag, own_tag, other_tag);
          } else {
            TORCH_CHECK(false, kBwd, ": no pair term with these roles for kind ", kind);
          }
        });
      });
    });
  });
}

// Dynamic shared memory of tile_grad_kernel at width d, or 0 where the accumulator does not fit the
// device (the chunked pass takes those widths).
size_t tiled_gradient_smem(const at::Tensor& x) {
  const int64_t bytes = grad_acc_bytes(x.size(1));
  const DeviceLimits limits = device_limits(x.device().index());
  const int64_t fixed = grad_static_smem(per_word(x));
  return bytes + fixed + limits.reserved <= limits.optin ? static_cast<size_t>(bytes) : 0;
}

// One pass on tile_grad_kernel: one launch; nothing of size (rows, n) or (rows, d) in device memory.
void tiled_gradient_pass(const Side& own, const Side& other, const GradChunk& proto, int64_t kind, bool normalize,
                         bool has_own, bool has_other, bool columns, const at::Tensor* out, size_t smem) {
  const at::Tensor& x = *own.x;
  const at::Tensor& y = *other.x;
  TileGrad f{};
  if (out != nullptr) f.out = out->data_ptr();
  f.own = x.data_ptr();
  f.other = y.data_ptr();
  f.n_own = x.size(0);
  f.n_other = y.size(0);
  f.d = x.size(1);
  f.inv_own = own.inv;
  f.inv_other = other.inv;
  f.proj_own = own.proj;
  f.proj_other = other.proj;
  f.logit_scale = proto.logit_scale;
  f.logit_bias = proto.logit_bias;
  f.labels = proto.labels;
  f.own_role = proto.own;
  f.other_role = proto.other;
  f.coef0 = proto.coef0;
  f.coef1 = proto.coef1;
  f.acc_stride = static_cast<int>(grad_acc_stride(f.d));
  f.columns = columns;
  f.vec = packet_rows(x) && packet_rows(y);
  const size_t dyn = out != nullptr ? smem : 0;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    with_pass_flags(kind, normalize, has_own, has_other, [&](auto kind_tag, auto norm_tag, auto own_tag,
                                                                auto other_tag) {
      launch(x.device(),
             &tile_grad_kernel<T, decltype(kind_tag)::value, decltype(norm_tag)::value, decltype(own_tag)::value,
                               decltype(other_tag)::value>,
             grid_for((f.n_own + kGradRows - 1) / kGradRows), kGradThreads, dyn, f);
    });
  };
  dispatch_float(x.scalar_type(), kBwd, run);
}

// Walks chunks of own's rows: S_c, then dZ_c as G_c and the row sums, then (with `out`) G_c @ other
// and the normalisation's backward into out. Half inputs whose accumulator fits the device's shared
// memory take the tiled pass instead.
void gradient_pass(const Side& own, const Side& other, const GradChunk& proto, int64_t kind, bool normalize,
                   bool has_own, bool has_other, bool columns, const at::Tensor* out) {
  const size_t smem = tiled_gradient_smem(*own.x);
  if (smem > 0) {
    tiled_gradient_pass(own, other, proto, kind, normalize, has_own, has_other, columns, out, smem);
    return;
  }
  const at::Tensor& x = *own.x;
  const at::Tensor& y = *other.x;
  const int64_t rows_total = x.size(0), n = y.size(0), d = x.size(1);
  const int64_t chunk = rows_per_chunk(rows_total, n, d, x, y);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sim = at::empty({chunk, n}, f32);
  at::Tensor g, acc, ncoef, unscale, bound;
  // fp16: a clamped other row (all zeros) weighs 0, so that its r' = 1e12 stays out of the bound
  const float* zero_rows = normalize && x.scalar_type() == at::kHalf ? other.proj : nullptr;
  if (out != nullptr) {
    g = at::empty({chunk, n}, x.options());
    acc = at::empty({chunk, d}, f32);
    unscale = at::empty({chunk}, f32);
    bound = at::empty({2}, f32);
    if (normalize) ncoef = at::empty({chunk}, f32);
    launch(x.device(), &weight_bound_kernel, 1, kThreads, 0, other.inv, zero_rows,
           has_other ? proto.other.g : nullptr, n, bound.data_ptr<float>());
  }
  float* const sim_buf = sim.data_ptr<float>();
  float* const acc_buf = out != nullptr ? acc.data_ptr<float>() : nullptr;
  GradChunk gc = proto;
  gc.sim = sim_buf;
  gc.n = n;
  gc.inv_own = own.inv;
  gc.inv_other = other.inv;
  gc.g_out = out != nullptr ? g.data_ptr() : nullptr;
  gc.proj_other = other.proj;
  gc.ncoef = out != nullptr && normalize ? ncoef.data_ptr<float>() : nullptr;
  gc.bound = out != nullptr ? bound.data_ptr<float>() : nullptr;
  gc.unscale = out != nullptr ? unscale.data_ptr<float>() : nullptr;
  FinishGrad fg{};
  if (out != nullptr) {
    fg.acc = acc_buf;
    fg.d = d;
    fg.x = x.data_ptr();
    fg.inv = own.inv;
    fg.proj = own.proj;
    fg.ncoef = gc.ncoef;
    fg.unscale = gc.unscale;
    fg.out = out->data_ptr();
  }
  dispatch_float(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    with_pass_flags(kind, normalize, has_own, has_other, [&](auto kind_tag, auto norm_tag, auto own_tag,
                                                             auto other_tag) {
      constexpr int kKind = decltype(kind_tag)::value;
      constexpr bool kNorm = decltype(norm_tag)::value, kOwn = decltype(own_tag)::value;
      constexpr bool kOther = decltype(other_tag)::value;
      for_each_similarity_chunk(x, y, sim, chunk, [&](int64_t r0, int64_t rows) {
        gc.row0 = r0;
        gc.rows = rows;
        launch(x.device(), &pair_grad_kernel<T, kKind, kNorm, kOwn, kOther>, grid_for(rows), kThreads, 0, gc);
        if (out == nullptr || d == 0) return;
        gradient_product(g.narrow(0, 0, rows), y, acc.narrow(0, 0, rows));
        fg.row0 = r0;
        fg.rows = rows;
        launch(x.device(), &finish_grad_kernel<T, kNorm>, warp_rows_grid(rows), kThreads, 0, fg);
      });
    });
  });
}

Role role(const float* g, const float* lse, const float* npos, float weight) { return Role{g, lse, npos, weight}; }

void contrastive_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& query, const at::Tensor& key,
                          const std::optional<at::Tensor>& labels, const at::Tensor& logit_scale,
                          const at::Tensor& logit_bias, const at::Tensor& stats,
                          const std::optional<at::Tensor>& grad_query, const std::optional<at::Tensor>& grad_key,
                          const std::optional<at::Tensor>& grad_coef,
                          int64_t kind, bool normalize, bool symmetric) {
  check_inputs(kBwd, query, key, labels, logit_scale, logit_bias, kind, symmetric);
  const int64_t B = query.size(0), M = key.size(0);
  check_f32_rows(kBwd, "grad_rows", grad_rows, query, {B});
  check_f32_rows(kBwd, "stats", stats, query, {2, B});
  auto check_grad = [&](const char* name, const std::optional<at::Tensor>& grad, const at::Tensor& like) {
    if (!grad.has_value()) return;
    check_on(kBwd, name, *grad, like);
    check_dtype(kBwd, name, *grad, like.scalar_type());
    check_shape(kBwd, name, *grad, like.sizes());
    TORCH_CHECK_VALUE(grad->is_contiguous(), kBwd, ": ", name, " must be contiguous, got strides ", grad->strides());
  };
  check_grad("grad_query", grad_query, query);
  check_grad("grad_key", grad_key, key);
  TORCH_CHECK_VALUE(kind != kSupCon || !grad_key.has_value(), kBwd, ": kind SUPCON writes grad_query only");
  if (grad_coef.has_value()) check_f32_rows(kBwd, "grad_coef", *grad_coef, query, {2, B});
  if (B == 0) {
    if (grad_key.has_value()) grad_key->zero_();
    return;
  }
  symmetric = symmetric && kind == kInfoNce;
  const c10::cuda::CUDAGuard guard(query.device());
  const auto f32 = query.options().dtype(at::kFloat);

  at::Tensor norms_q, norms_k;  // (2, rows): r, and r^2 where unclamped
  Side q_side{&query, nullptr, nullptr}, k_side{&key, nullptr, nullptr};
  if (normalize) {
    norms_q = at::empty({2, B}, f32);
    inverse_norms(query, norms_q.data_ptr<float>(), norms_q.data_ptr<float>() + B);
    q_side.inv = norms_q.data_ptr<float>();
    q_side.proj = q_side.inv + B;
    k_side.inv = q_side.inv;
    k_side.proj = q_side.proj;
    if (kind != kSupCon) {
      norms_k = at::empty({2, M}, f32);
      inverse_norms(key, norms_k.data_ptr<float>(), norms_k.data_ptr<float>() + M);
      k_side.inv = norms_k.data_ptr<float>();
      k_side.proj = k_side.inv + M;
    }
  }

  const float* g = grad_rows.data_ptr<float>();
  const float* lse = stats.data_ptr<float>();
  const float* stats1 = lse + B;  // column lse (symmetric InfoNCE) or positive counts (SupCon)
  GradChunk proto{};
  proto.logit_scale = logit_scale.data_ptr<float>();
  proto.logit_bias = logit_bias.data_ptr<float>();
  proto.labels = kind == kSupCon ? labels->data_ptr<int64_t>() : nullptr;

  if (grad_query.has_value() || grad_coef.has_value()) {
    GradChunk rows = proto;
    bool has_other = false;
    if (kind == kSupCon) {  // anchor i and key-role j -> i, both read off row i of S
      rows.own = role(g, lse, stats1, 1.f);
      rows.other = role(g, lse, stats1, 1.f);
      has_other = true;
    } else if (symmetric) {
      rows.own = role(g, lse, nullptr, 0.5f);
      rows.other = role(g, stats1, nullptr, 0.5f);
      has_other = true;
    } else {
      rows.own = role(g, lse, nullptr, 1.f);
    }
    if (grad_coef.has_value()) {
      rows.coef0 = grad_coef->data_ptr<float>();
      rows.coef1 = rows.coef0 + B;
    }
    gradient_pass(q_side, k_side, rows, kind, normalize, true, has_other, false,
                  grad_query.has_value() ? &*grad_query : nullptr);
  }
  if (grad_key.has_value()) {  // key rows j against the B query rows, on S^T
    GradChunk cols = proto;
    bool has_own = false;
    if (symmetric) {
      cols.own = role(g, stats1, nullptr, 0.5f);
      cols.other = role(g, lse, nullptr, 0.5f);
      has_own = true;
    } else {
      cols.other = role(g, lse, nullptr, 1.f);
    }
    gradient_pass(k_side, q_side, cols, kind, normalize, has_own, true, true, &*grad_key);
  }
}

}  // namespace
}  // namespace contrastive
}  // namespace lossforge

TORCH_LIBRARY_IMPL(lossforge, LOSSFORGE_DISPATCH_KEY, m) {
  m.impl("contrastive_fwd_cuda", TORCH_FN(lossforge::contrastive::contrastive_fwd_cuda));
  m.impl("contrastive_bwd_cuda", TORCH_FN(lossforge::contrastive::contrastive_bwd_cuda));
}

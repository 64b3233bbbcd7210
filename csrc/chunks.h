// Rows per chunk of the chunked host loops (contrastive.cu, triplet.cu): the rule and the constants of
// lossforge_kernels/ops/_chunks.py's chunk_rows, documented there; tests/test_chunks.py holds the two
// to the same answers. Plain C++, so that it compiles and is tested without CUDA.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lossforge {
namespace chunks {

constexpr int64_t kMinChunkBytes = int64_t{32} << 20;
constexpr int64_t kMaxChunkBytes = int64_t{256} << 20;
constexpr int64_t kTileRows = 128;

// Rows per chunk of `total` rows whose `buffers` chunk buffers take `row_bytes` per row each:
// `chunk_size` when > 0; else as many as fit a quarter of `input_bytes`, clamped to [kMinChunkBytes,
// kMaxChunkBytes], raised to `min_rows` while those fit kMaxChunkBytes, a multiple of kTileRows once
// that many fit. Always in [1, max(total, 1)].
inline int64_t chunk_rows(int64_t total, int64_t row_bytes, int64_t chunk_size, int64_t input_bytes,
                          int64_t buffers = 1, int64_t min_rows = 1) {
  if (chunk_size > 0) return std::max<int64_t>(1, std::min(total, chunk_size));
  const int64_t per_row = std::max<int64_t>(1, buffers) * std::max<int64_t>(1, row_bytes);
  const int64_t budget = std::min(kMaxChunkBytes, std::max(kMinChunkBytes, input_bytes / 4));
  int64_t rows = std::max(budget / per_row, std::min(min_rows, kMaxChunkBytes / per_row));
  if (rows >= kTileRows) rows -= rows % kTileRows;
  return std::max<int64_t>(1, std::min(total, rows));
}

}  // namespace chunks
}  // namespace lossforge

// The launch plan of the per-row kernels (block size, shared-memory cache, prefetch, grid): plain
// C++ over the device's limits, so that it compiles and is tested without CUDA.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace lossforge {

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

inline unsigned int grid_for(int64_t blocks) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)));
}

// A tuning knob from the environment (bench/NOTES.md lists them), or `fallback` when unset.
inline double env_knob(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atof(v) : fallback;
}

struct DeviceLimits {
  int64_t sm_smem;   // shared memory per multiprocessor
  int64_t optin;     // the most one block may opt in to
  int64_t reserved;  // per block, taken by the system
  int64_t sms;
  int64_t l2;
};

// Kernels are compiled with __launch_bounds__(1024), i.e. at most 64 registers per thread, so an SM
// holds 1024 / threads blocks by registers (65536 per SM).
constexpr int kRegisterLimitedThreadsPerSm = 1024;
// Upper bound of the static shared memory of a row kernel (its reduction scratch).
constexpr int64_t kRowStaticSmem = 1024;
// Default L2 prefetch of the next row, in KiB (LOSSFORGE_ROW_PREFETCH_KB overrides; 0 = off).
constexpr double kRowPrefetchKb = 0;

struct RowPlan {
  int threads;
  int64_t resident;        // blocks of this plan an SM holds at once
  int64_t cache_packets;   // leading 16-byte packets of a row kept in shared memory between passes
  size_t smem;
  int64_t prefetch_bytes;  // of the block's next row, asked of L2 once the current row is read
};

// One block per row. `packets`: 16-byte packets in a row; `unroll`: packets in flight per thread.
// About four rounds of `unroll` packets per thread, in blocks of up to 512 threads (256 without a
// cache), so that several rows share an SM and one row's reduction overlaps another's streaming.
// With `cache`, the row (or its head) lives in shared memory between the two passes; if the
// uncached tails of all rows in flight would take more than half of L2, use one 1024-thread block
// per SM with the largest cache instead, so that the re-read still hits L2.
// Knobs: LOSSFORGE_ROW_THREADS fixes the block size, LOSSFORGE_ROW_L2_SHARE the share of L2 the
// re-read tails may take (default 0.5), LOSSFORGE_ROW_CACHE=0 keeps nothing in shared memory,
// LOSSFORGE_ROW_PREFETCH_KB the L2 prefetch of the next row.
inline RowPlan plan_rows(int64_t packets, int unroll, bool cache, const DeviceLimits& d) {
  const int forced = static_cast<int>(env_knob("LOSSFORGE_ROW_THREADS", 0));
  const bool pinned = forced >= 32 && forced <= 1024 && (forced & (forced - 1)) == 0;
  const int64_t cap = cache ? 512 : 256;
  const int64_t rounds = (packets + 4 * unroll - 1) / (4 * unroll);
  const int threads = pinned ? forced : static_cast<int>(std::clamp<int64_t>(next_pow2(rounds), 32, cap));
  const double prefetch_kb = env_knob("LOSSFORGE_ROW_PREFETCH_KB", kRowPrefetchKb);
  RowPlan p{threads, std::clamp<int64_t>(kRegisterLimitedThreadsPerSm / threads, 1, 32), 0, 0,
            static_cast<int64_t>(std::max(0.0, prefetch_kb) * 1024)};
  if (!cache || env_knob("LOSSFORGE_ROW_CACHE", 1) == 0) return p;
  auto budget = [&](int64_t blocks_per_sm) {
    const int64_t b = std::min(d.optin, d.sm_smem / blocks_per_sm - d.reserved) - kRowStaticSmem;
    return std::max<int64_t>(0, b / 16);
  };
  int64_t cached = std::min(packets, budget(p.resident));
  const double l2_share = env_knob("LOSSFORGE_ROW_L2_SHARE", 0.5);
  if (!pinned && cached < packets && d.sms * p.resident * (packets - cached) * 16 > d.l2 * l2_share) {
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
inline unsigned int grid_for_rows(const RowPlan& p, int64_t rows, const DeviceLimits& d) {
  if (p.prefetch_bytes == 0) return grid_for(rows);
  return grid_for(std::min(rows, p.resident * d.sms));
}

}  // namespace lossforge

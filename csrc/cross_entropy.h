// What the cross-entropy host code (cross_entropy.cu) and its kernels (cross_entropy.cuh) share:
// the kernel arguments and, per dtype, the table of kernels over the option sets. Plain C++.
#pragma once

#include <cstdint>

namespace lossforge {

struct CeArgs {
  const void* x;
  int64_t sx;
  const int64_t* target;  // class indices, or nullptr for probability targets
  const void* prob;       // probability targets (logits' dtype)
  int64_t sq;
  const float* weight;      // (C,) or nullptr
  const float* alpha;       // (C,) or nullptr
  const float* weight_sum;  // sum of weight (device), when smoothing with weights
  void* grad;
  int64_t sg;
  float* loss;
  float* stats;
  const float* scale;  // forward: 0-dim grad_factor; backward: grad_rows (one per row)
  int64_t rows, C, ignore;
  float label_smoothing, z, cap, inv_cap, gamma, alpha_f;
  int64_t cache_packets;
  int64_t prefetch_bytes;
};

// 16-byte packets of logits in flight per thread: fewer when each also brings targets and weights,
// or needs the registers of tanh.
constexpr int unroll_for(bool soft, bool welem, bool cap) {
  return soft && welem ? 1 : soft || welem || cap ? 2 : 4;
}

using CeKernel = void (*)(CeArgs);

// The kernels of one dtype and option set, with what the row plan needs to know of them.
struct CeKernels {
  CeKernel fwd, fwd_grad, bwd;
  int unroll;            // 16-byte packets in flight per thread
  int elems_per_packet;  // logits per 16-byte packet
};

// Every option set's kernels for one dtype. Per-class weights enter the row loop only with
// probability targets or smoothing (otherwise only the target's weight is read); smoothing is a
// flag only for class targets (probability targets always keep their sums).
struct CeKernelTable {
  CeKernels soft[2][2];    // probability targets, [weights][softcap]
  CeKernels plain[2];      // class targets without smoothing, [softcap]
  CeKernels smooth[2][2];  // class targets with smoothing, [weights][softcap]

  const CeKernels& select(bool soft_target, bool weights, bool smoothing, bool softcap) const {
    if (soft_target) return soft[weights][softcap];
    return smoothing ? smooth[weights][softcap] : plain[softcap];
  }
};

// Defined in cross_entropy.cuh; instantiated for one dtype in each cross_entropy_<dtype>.cu.
template <typename T>
const CeKernelTable& ce_kernel_table();

}  // namespace lossforge

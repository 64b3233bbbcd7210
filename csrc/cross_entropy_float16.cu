// The cross-entropy kernels for float16 logits: the forward (without and with a gradient) and the
// backward of every option set, 30 kernels (cross_entropy.cuh). One file per dtype, so that the
// dtypes compile in parallel (nvcc 13.0, sm_80 + sm_90: 30-40 s each; all 90 in one file took 150 s).

#include "cross_entropy.cuh"

namespace lossforge {

template const CeKernelTable& ce_kernel_table<c10::Half>();

}  // namespace lossforge

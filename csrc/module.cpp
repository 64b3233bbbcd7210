// The extension module lossforge_kernels._C. Importing it registers the CUDA implementations of
// the `lossforge` kernel ops, whose schemas are defined in Python (lossforge_kernels/ops/).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  m.impl("cross_entropy_fwd_cuda", TORCH_FN(lossforge::cross_entropy_fwd_cuda));
  m.impl("cross_entropy_bwd_cuda", TORCH_FN(lossforge::cross_entropy_bwd_cuda));
  m.impl("sigmoid_focal_fwd_cuda", TORCH_FN(lossforge::sigmoid_focal_fwd_cuda));
  m.impl("sigmoid_focal_bwd_cuda", TORCH_FN(lossforge::sigmoid_focal_bwd_cuda));
  m.impl("scale_grad_cuda", TORCH_FN(lossforge::scale_grad_cuda));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of lossforge_kernels, reached through torch.ops.lossforge.*_cuda";
}

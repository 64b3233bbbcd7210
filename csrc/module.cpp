// The extension module lossforge_kernels._C. Importing it loads the CUDA implementations of the
// `lossforge` kernel ops, which each csrc/<family>.cu registers beside its kernels
// (TORCH_LIBRARY_IMPL); the op schemas are defined in Python (lossforge_kernels/ops/).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of lossforge_kernels, reached through torch.ops.lossforge.*_cuda";
}

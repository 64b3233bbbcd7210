// Emulation stand-in (see lossforge_emulate.h): kernels run when launched, so there is one stream.
#pragma once
#include <c10/core/Device.h>
#include "../../lossforge_emulate.h"
namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10

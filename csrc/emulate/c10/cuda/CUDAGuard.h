// Emulation stand-in (see lossforge_emulate.h): there is one device, the host.
#pragma once
#include <c10/core/Device.h>
#include "../../lossforge_emulate.h"
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10

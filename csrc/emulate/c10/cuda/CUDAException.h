// Emulation stand-in (see lossforge_emulate.h): launch errors are thrown by the launch itself.
#pragma once
#include <c10/util/Exception.h>
#include "../../lossforge_emulate.h"
#define C10_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t lossforge_err_ = (expr);                                                     \
    TORCH_CHECK(lossforge_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(lossforge_err_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// Emulation stand-in for the CUDA toolkit header of this name (see lossforge_emulate.h).
#pragma once
#include "lossforge_emulate.h"

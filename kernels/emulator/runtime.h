// The emulator's runtime as the driver double sees it: kernels by name, and running a grid.
#pragma once

#include <string>

#include "device.h"

namespace emu {

// The kernel registered under `name` (EMU_KERNEL), or null.
const Kernel* find_kernel(const char* name);

// Runs `entry` over the whole grid with `params` (cuLaunchKernel's argument array); returns
// an empty string, or why the launch failed.
std::string launch(const char* name, Entry entry, uint3 grid, uint3 block, void** params);

}  // namespace emu

// The one call the cuBLAS double makes into the driver double: run a piece of work on a stream
// now, or record it when that stream captures a CUDA graph (driver.cpp). Returns the work's
// status, or success when recorded.
#pragma once

#include <functional>

int llmctl_emulator_submit(void* stream, std::function<int()> op);

// Emulated build: the launch check raises (c10::Error, a RuntimeError in Python) what the emulator
// found in the kernel that just ran (launch limits, barrier or warp-shuffle misuse), as
// CUDA_LAUNCH_BLOCKING=1 plus compute-sanitizer's synccheck would on a GPU.
#pragma once

#include <cuda_runtime.h>

namespace emu {
void check_launch(const char* file, int line);
void check_call(cudaError_t err, const char* expr, const char* file, int line);
}  // namespace emu

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::check_launch(__FILE__, __LINE__)
#define C10_CUDA_CHECK(expr) ::emu::check_call((expr), #expr, __FILE__, __LINE__)

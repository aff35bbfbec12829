// CPU emulation of the CUDA device side, force-included (g++ -include) into the emulated build of
// csrc/*_kernel.cu (tests/emu_build.py). The kernel files compile unchanged, except that each launch
// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to `EMU_LAUNCH(kernel, grid, block,
// smem, stream)(args)`. The host wrappers and bindings around them are the real ones, compiled
// against csrc/emu/ stubs of cuda_runtime.h, c10/cuda and CUB, so tensors live on the CPU.
//
// Execution model (runtime.cpp): a launch runs its blocks one after another, and the threads of a
// block as fibers under a deterministic scheduler, which AddressSanitizer and ThreadSanitizer see as
// threads, synchronised only where CUDA synchronises them, so TSan reports a missing barrier as a
// data race. __syncthreads is a barrier that a returned thread leaves (as on sm_70+); at the end of
// each block all its threads must have passed the same number of barriers (compute-sanitizer
// synccheck's rule), else the launch check raises, as it does on a deadlock. __shfl_down_sync
// exchanges values at a warp barrier and requires every lane of the warp to take part. atomicAdd is
// std::atomic_ref. __shared__ arrays are function statics: one copy, enough as blocks never overlap.
#pragma once

#include <atomic>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

struct ThreadCtx {
  dim3 thread, block, block_dim, grid_dim;
};
// Coordinates of the CUDA thread running now (set by the scheduler, runtime.cpp).
extern constinit std::atomic<const ThreadCtx*> tctx;

// Runs body(arg) once per thread of every block of the grid; errors are kept for check_launch.
void launch(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg);
void syncthreads();
float shfl_down(unsigned int mask, float value, int delta);

// kernel<<<grid, block, smem, stream>>>(args): the arguments are converted to the kernel's
// parameter types once, as the launch copies them, and every thread calls the kernel with them.
template <class... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <class... A>
  void operator()(A&&... args) const {
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, {std::forward<A>(args)...}};
    launch(name, grid, block, smem, [](void* c) {
      auto* call = static_cast<Call*>(c);
      std::apply(call->kernel, call->params);
    }, &call);
  }
};

template <class... P>
Launcher<P...> make_launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                         cudaStream_t = nullptr) {
  return {name, kernel, grid, block, smem};
}

}  // namespace emu

#define EMU_LAUNCH(kernel, ...) ::emu::make_launch(#kernel, kernel, __VA_ARGS__)
#define threadIdx (::emu::tctx.load(std::memory_order_relaxed)->thread)
#define blockIdx (::emu::tctx.load(std::memory_order_relaxed)->block)
#define blockDim (::emu::tctx.load(std::memory_order_relaxed)->block_dim)
#define gridDim (::emu::tctx.load(std::memory_order_relaxed)->grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }
inline float __shfl_down_sync(unsigned int mask, float value, int delta) {
  return ::emu::shfl_down(mask, value, delta);
}
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

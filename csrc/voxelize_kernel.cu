// Voxelize forward: V[z, y, x] = sum_g density_g exp(-q/2) over voxels with q <= k^2.
#include <c10/cuda/CUDAException.h>

#include "gaussian_math.cuh"
#include "kernels.h"

namespace cryogs {

namespace {

constexpr int THREADS = 256;
constexpr int SLAB = 8;  // z-planes of a Gaussian's box per block

// Block (g, s) evaluates Gaussian g on the planes lo_z + SLAB s .. lo_z + SLAB s + SLAB - 1 of its
// cutoff box (the same axis_span rule as the 2D tiles, per axis): its threads stride over those
// voxels and add into the volume with atomics, and blocks past the box return after the setup. A
// Gaussian filling a 256^3 box thus takes 32 blocks of 2048 voxels per thread, not one of 65536.
// Forward only; the summation order is not fixed, so the result is not bitwise reproducible.
__global__ void __launch_bounds__(THREADS)
    voxelize_fwd_kernel(int D, float p, float c0, float k2, float cutoff,
                        const float* __restrict__ means,       // [N, 3]
                        const float* __restrict__ quats,       // [N, 4]
                        const float* __restrict__ scales,      // [N, 3]
                        const float* __restrict__ amplitudes,  // [N]
                        float* __restrict__ volume) {          // [D, D, D]
  const int64_t g = blockIdx.x;
  float mu[3], q[4], s[3];
  GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    mu[k] = means[3 * g + k];
    s[k] = scales[3 * g + k];
  }
  GM_UNROLL
  for (int k = 0; k < 4; ++k) q[k] = quats[4 * g + k];
  const VoxelGauss<float> vg = voxel_setup(mu, q, s, amplitudes[g], p, c0, cutoff);
  if (!vg.ok) return;
  int lo[3], hi[3];
  GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    if (!axis_span(vg.c[k], vg.radii[k], D, lo[k], hi[k])) return;
  }
  const int z0 = lo[2] + SLAB * static_cast<int>(blockIdx.y);
  if (z0 > hi[2]) return;
  const int64_t nx = hi[0] - lo[0] + 1, ny = hi[1] - lo[1] + 1, nz = min(hi[2], z0 + SLAB - 1) - z0 + 1;
  const int64_t total = nx * ny * nz;
  for (int64_t v = threadIdx.x; v < total; v += THREADS) {
    const int x = lo[0] + static_cast<int>(v % nx);
    const int y = lo[1] + static_cast<int>((v / nx) % ny);
    const int z = z0 + static_cast<int>(v / (nx * ny));
    const float val = voxel_eval(vg, static_cast<float>(x) - vg.c[0], static_cast<float>(y) - vg.c[1],
                                 static_cast<float>(z) - vg.c[2], k2);
    if (val != 0.f) atomicAdd(volume + (static_cast<int64_t>(z) * D + y) * D + x, val);
  }
}

}  // namespace

void launch_voxelize_fwd(int64_t N, int D, float pixel_size, float cutoff, const float* means, const float* quats,
                         const float* scales, const float* amplitudes, float* volume, cudaStream_t stream) {
  if (N == 0) return;
  const dim3 grid(static_cast<unsigned int>(N), static_cast<unsigned int>((D + SLAB - 1) / SLAB));
  voxelize_fwd_kernel<<<grid, THREADS, 0, stream>>>(
      D, pixel_size, static_cast<float>(D / 2), cutoff * cutoff, cutoff, means, quats, scales, amplitudes, volume);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cryogs

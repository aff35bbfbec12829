// Rasterize forward: I_b(x) = sum over the tile's instances of w exp(-q/2), q <= k^2.
#include <c10/cuda/CUDAException.h>

#include "gaussian_math.cuh"
#include "kernels.h"

namespace cryogs {

namespace {

// One block per (image, tile), one thread per pixel. The tile's instances are staged in batches of
// TS*TS (centre, prescaled conic, weight) in shared memory; every batch is processed (a sum has no
// early exit) and each pixel is written exactly once, without atomics. Threads whose pixel lies
// outside the image (D not a multiple of TS) still help stage batches. The per-tile instance order
// is fixed by the stable sort (ascending g), so the result is bitwise deterministic.
template <int TS>
__global__ void __launch_bounds__(TS * TS)
    rasterize_fwd_kernel(int64_t N, int D, int tiles_x, float k2s,
                         const float* __restrict__ means2d,   // [B, N, 2]
                         const float* __restrict__ conics,    // [B, N, 3]
                         const float* __restrict__ weights,   // [B, N]
                         const int64_t* __restrict__ ranges,  // [B*T, 2]
                         const int32_t* __restrict__ gids,    // [M]
                         float* __restrict__ out) {           // [B, D, D]
  constexpr int BS = TS * TS;
  __shared__ float2 s_u[BS];
  __shared__ float4 s_cw[BS];  // (pa, pb, pc, w)
  const int T = tiles_x * tiles_x;
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / T;
  const int tile = static_cast<int>(bt % T);
  const int tid = threadIdx.x;
  const int px = (tile % tiles_x) * TS + tid % TS;
  const int py = (tile / tiles_x) * TS + tid / TS;
  const float fx = static_cast<float>(px), fy = static_cast<float>(py);
  const int64_t start = ranges[2 * bt], end = ranges[2 * bt + 1];
  float acc = 0.f;
  for (int64_t base = start; base < end; base += BS) {
    const int64_t i = base + tid;
    if (i < end) {
      const int64_t pair = b * N + gids[i];
      const float c[3] = {conics[3 * pair], conics[3 * pair + 1], conics[3 * pair + 2]};
      const ScaledConic<float> sc = scale_conic(c);
      s_u[tid] = make_float2(means2d[2 * pair], means2d[2 * pair + 1]);
      s_cw[tid] = make_float4(sc.pa, sc.pb, sc.pc, weights[pair]);
    }
    __syncthreads();
    const int n = static_cast<int>(end - base < BS ? end - base : BS);
    for (int j = 0; j < n; ++j) {
      const float2 u = s_u[j];
      const float4 cw = s_cw[j];
      const ScaledConic<float> sc{cw.x, cw.y, cw.z};
      acc += cw.w * eval_scaled(sc, fx - u.x, fy - u.y, k2s);
    }
    __syncthreads();
  }
  if (px < D && py < D) out[(b * D + py) * D + px] = acc;
}

}  // namespace

void launch_rasterize_fwd(int64_t B, int64_t N, int D, int tiles_x, float cutoff, const float* means2d,
                          const float* conics, const float* weights, const int64_t* ranges, const int32_t* gids,
                          float* out, cudaStream_t stream) {
  const int64_t blocks = B * tiles_x * tiles_x;
  if (blocks == 0) return;
  rasterize_fwd_kernel<TILE_SIZE><<<static_cast<unsigned int>(blocks), TILE_SIZE * TILE_SIZE, 0, stream>>>(
      N, D, tiles_x, scaled_cutoff(cutoff), means2d, conics, weights, ranges, gids, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cryogs

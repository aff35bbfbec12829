// Rasterize backward, stage A: from dL/dI to per-pair gradients of (u, conic, w).
#include <c10/cuda/CUDAException.h>

#include "gaussian_math.cuh"
#include "kernels.h"

namespace cryogs {

namespace {

// One block per (image, tile). The tile's dL/dI is staged in shared memory; then each thread takes
// one instance (pair, tile) at a time, loops over only the pixels of the pair's cutoff box inside
// the tile, keeps the six moments of PixelMoments in registers, and finally adds the pair's six
// gradient components with atomics (contention: only the few tiles a pair touches).
template <int TS>
__global__ void __launch_bounds__(TS * TS)
    rasterize_bwd_kernel(int64_t N, int D, int tiles_x, float k2s,
                         const float* __restrict__ means2d,   // [B, N, 2]
                         const float* __restrict__ conics,    // [B, N, 3]
                         const float* __restrict__ weights,   // [B, N]
                         const float* __restrict__ radii,     // [B, N, 2]
                         const int64_t* __restrict__ ranges,  // [B*T, 2]
                         const int32_t* __restrict__ gids,    // [M]
                         const float* __restrict__ v_image,   // [B, D, D]
                         float* __restrict__ v_means2d,       // [B, N, 2]
                         float* __restrict__ v_conics,        // [B, N, 3]
                         float* __restrict__ v_weights) {     // [B, N]
  constexpr int BS = TS * TS;
  __shared__ float s_G[BS];
  const int T = tiles_x * tiles_x;
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / T;
  const int tile = static_cast<int>(bt % T);
  const int tid = threadIdx.x;
  const int x_base = (tile % tiles_x) * TS, y_base = (tile / tiles_x) * TS;
  {
    const int px = x_base + tid % TS, py = y_base + tid / TS;
    s_G[tid] = (px < D && py < D) ? v_image[(b * D + py) * D + px] : 0.f;
  }
  __syncthreads();
  const int64_t start = ranges[2 * bt], end = ranges[2 * bt + 1];
  for (int64_t i = start + tid; i < end; i += BS) {
    const int64_t pair = b * N + gids[i];
    const float ux = means2d[2 * pair], uy = means2d[2 * pair + 1];
    Rect pix, tiles;
    if (!tile_rect(ux, uy, radii[2 * pair], radii[2 * pair + 1], D, TS, pix, tiles)) continue;
    const int x0 = max(pix.x0, x_base), x1 = min(pix.x1, x_base + TS - 1);
    const int y0 = max(pix.y0, y_base), y1 = min(pix.y1, y_base + TS - 1);
    const float conic[3] = {conics[3 * pair], conics[3 * pair + 1], conics[3 * pair + 2]};
    const ScaledConic<float> sc = scale_conic(conic);
    PixelMoments<float> mo;
    mo.zero();
    for (int y = y0; y <= y1; ++y) {
      const float dy = static_cast<float>(y) - uy;
      const float* row = s_G + (y - y_base) * TS;
      for (int x = x0; x <= x1; ++x) {
        const float dx = static_cast<float>(x) - ux;
        const float ge = row[x - x_base] * eval_scaled(sc, dx, dy, k2s);
        mo.add(ge, dx, dy);
      }
    }
    if (mo.s0 == 0.f && mo.sx == 0.f && mo.sy == 0.f && mo.sxx == 0.f && mo.sxy == 0.f && mo.syy == 0.f) continue;
    float v_u[2], v_c[3], v_w;
    finalize_moments(mo, conic, weights[pair], v_u, v_c, v_w);
    atomicAdd(v_means2d + 2 * pair, v_u[0]);
    atomicAdd(v_means2d + 2 * pair + 1, v_u[1]);
    atomicAdd(v_conics + 3 * pair, v_c[0]);
    atomicAdd(v_conics + 3 * pair + 1, v_c[1]);
    atomicAdd(v_conics + 3 * pair + 2, v_c[2]);
    atomicAdd(v_weights + pair, v_w);
  }
}

}  // namespace

void launch_rasterize_bwd(int64_t B, int64_t N, int D, int tiles_x, float cutoff, const float* means2d,
                          const float* conics, const float* weights, const float* radii, const int64_t* ranges,
                          const int32_t* gids, const float* v_image, float* v_means2d, float* v_conics,
                          float* v_weights, cudaStream_t stream) {
  const int64_t blocks = B * tiles_x * tiles_x;
  if (blocks == 0 || N == 0) return;
  rasterize_bwd_kernel<TILE_SIZE><<<static_cast<unsigned int>(blocks), TILE_SIZE * TILE_SIZE, 0, stream>>>(
      N, D, tiles_x, scaled_cutoff(cutoff), means2d, conics, weights, radii, ranges, gids, v_image, v_means2d,
      v_conics, v_weights);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cryogs

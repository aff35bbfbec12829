// Preprocess (project every (image, Gaussian) pair to 2D) and its backward, stage B.
#include <c10/cuda/CUDAException.h>

#include "gaussian_math.cuh"
#include "kernels.h"

namespace cryogs {

namespace {

constexpr int FWD_THREADS = 256;

__global__ void preprocess_fwd_kernel(int64_t B, int64_t N, int D, float p, float cutoff,
                                      const float* __restrict__ means,       // [N, 3]
                                      const float* __restrict__ quats,       // [N, 4]
                                      const float* __restrict__ scales,      // [N, 3]
                                      const float* __restrict__ amplitudes,  // [N]
                                      const float* __restrict__ rotations,   // [B, 3, 3]
                                      const float* __restrict__ shifts,      // [B, 2]
                                      float* __restrict__ means2d,           // [B, N, 2]
                                      float* __restrict__ conics,            // [B, N, 3]
                                      float* __restrict__ weights,           // [B, N]
                                      float* __restrict__ radii,             // [B, N, 2]
                                      int32_t* __restrict__ tile_counts) {   // [B, N]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // pair b*N + g
  if (i >= B * N) return;
  const int64_t b = i / N, g = i % N;
  float A[9], t[2];
  GM_UNROLL
  for (int k = 0; k < 9; ++k) A[k] = rotations[9 * b + k];
  t[0] = shifts[2 * b];
  t[1] = shifts[2 * b + 1];
  const Gaussian<float> G = load_gaussian(g, means, quats, scales);
  const PairFwd<float> f = pair_forward(A, t, G.mu, G.L, amplitudes[g], p, static_cast<float>(D / 2), cutoff);
  means2d[2 * i] = f.u[0];
  means2d[2 * i + 1] = f.u[1];
  conics[3 * i] = f.conic[0];
  conics[3 * i + 1] = f.conic[1];
  conics[3 * i + 2] = f.conic[2];
  weights[i] = f.w;
  radii[2 * i] = f.radii[0];
  radii[2 * i + 1] = f.radii[1];
  tile_counts[i] = tile_count(f.ok, f.u[0], f.u[1], f.radii[0], f.radii[1], D, TILE_SIZE);
}

// Loads the upstream 2D gradients of pair i; false if they are all zero (the pair then contributes
// nothing, and is skipped so that invalid pairs never turn NaN intermediates into NaN gradients).
__device__ __forceinline__ bool load_pair_grads(int64_t i, const float* __restrict__ v_means2d,
                                                const float* __restrict__ v_conics,
                                                const float* __restrict__ v_weights, float v_u[2], float v_c[3],
                                                float& v_w) {
  v_u[0] = v_means2d[2 * i];
  v_u[1] = v_means2d[2 * i + 1];
  v_c[0] = v_conics[3 * i];
  v_c[1] = v_conics[3 * i + 1];
  v_c[2] = v_conics[3 * i + 2];
  v_w = v_weights[i];
  return v_u[0] != 0.f || v_u[1] != 0.f || v_c[0] != 0.f || v_c[1] != 0.f || v_c[2] != 0.f || v_w != 0.f;
}

// Stage B, per Gaussian: a block of GX Gaussians x BY image lanes. Each thread sums its Gaussian's
// contributions over images b = lane, lane + BY, ...; the BY partial sums are then added in a fixed
// order (deterministic, no atomics). Reduced quantities: v_L (9), v_mu (3), v_m (1).
constexpr int GX = 32;
constexpr int BY = 8;
constexpr int NACC = 13;

__global__ void __launch_bounds__(GX * BY)
    preprocess_bwd_gauss_kernel(int64_t B, int64_t N, float p,
                                const float* __restrict__ means,       // [N, 3]
                                const float* __restrict__ quats,       // [N, 4]
                                const float* __restrict__ scales,      // [N, 3]
                                const float* __restrict__ amplitudes,  // [N]
                                const float* __restrict__ rotations,   // [B, 3, 3]
                                const float* __restrict__ v_means2d,   // [B, N, 2]
                                const float* __restrict__ v_conics,    // [B, N, 3]
                                const float* __restrict__ v_weights,   // [B, N]
                                float* __restrict__ v_means,           // [N, 3]
                                float* __restrict__ v_quats,           // [N, 4]
                                float* __restrict__ v_scales,          // [N, 3]
                                float* __restrict__ v_amplitudes) {    // [N]
  __shared__ float red[BY][NACC][GX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * GX + tx;
  float acc[NACC];
  GM_UNROLL
  for (int k = 0; k < NACC; ++k) acc[k] = 0.f;
  Gaussian<float> G{};
  if (g < N) {
    G = load_gaussian(g, means, quats, scales);
    const float m = amplitudes[g];
    for (int64_t b = ty; b < B; b += BY) {
      const int64_t i = b * N + g;
      float v_u[2], v_c[3], v_w;
      if (!load_pair_grads(i, v_means2d, v_conics, v_weights, v_u, v_c, v_w)) continue;
      float A[9];
      GM_UNROLL
      for (int k = 0; k < 9; ++k) A[k] = rotations[9 * b + k];
      float v_M[6], v_m;
      if (!pair_backward_cov(A, G.L, m, p, v_c, v_w, v_M, v_m)) continue;
      projected_factor_vjp(A, G.L, p, v_M, acc, static_cast<float*>(nullptr));
      mean2d_vjp(A, G.mu, p, v_u, acc + 9, static_cast<float*>(nullptr), static_cast<float*>(nullptr));
      acc[12] += v_m;
    }
  }
  GM_UNROLL
  for (int k = 0; k < NACC; ++k) red[ty][k][tx] = acc[k];
  __syncthreads();
  if (ty != 0 || g >= N) return;
  GM_UNROLL
  for (int k = 0; k < NACC; ++k) {
    float sum = red[0][k][tx];
    for (int r = 1; r < BY; ++r) sum += red[r][k][tx];
    acc[k] = sum;
  }
  float v_s[3], v_q[4];
  load_gaussian_vjp(G, acc, v_q, v_s);
  GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    v_means[3 * g + k] = acc[9 + k];
    v_scales[3 * g + k] = v_s[k];
  }
  GM_UNROLL
  for (int k = 0; k < 4; ++k) v_quats[4 * g + k] = v_q[k];
  v_amplitudes[g] = acc[12];
}

// Stage B, per image: one block per image b sums the pose gradients over all Gaussians (strided
// over threads, then a fixed-order block reduction). Reduced: v_A rows 0-1 (6) and v_t (2).
constexpr int POSE_THREADS = 256;
constexpr int NPOSE = 8;

__global__ void __launch_bounds__(POSE_THREADS)
    preprocess_bwd_pose_kernel(int64_t B, int64_t N, float p,
                               const float* __restrict__ means,       // [N, 3]
                               const float* __restrict__ quats,       // [N, 4]
                               const float* __restrict__ scales,      // [N, 3]
                               const float* __restrict__ amplitudes,  // [N]
                               const float* __restrict__ rotations,   // [B, 3, 3]
                               const float* __restrict__ v_means2d,   // [B, N, 2]
                               const float* __restrict__ v_conics,    // [B, N, 3]
                               const float* __restrict__ v_weights,   // [B, N]
                               float* __restrict__ v_rotations,       // [B, 3, 3]
                               float* __restrict__ v_shifts) {        // [B, 2]
  __shared__ float red[POSE_THREADS / 32][NPOSE];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  float A[9];
  GM_UNROLL
  for (int k = 0; k < 9; ++k) A[k] = rotations[9 * b + k];
  float acc[NPOSE];
  GM_UNROLL
  for (int k = 0; k < NPOSE; ++k) acc[k] = 0.f;
  for (int64_t g = tid; g < N; g += POSE_THREADS) {
    const int64_t i = b * N + g;
    float v_u[2], v_c[3], v_w;
    if (!load_pair_grads(i, v_means2d, v_conics, v_weights, v_u, v_c, v_w)) continue;
    const Gaussian<float> G = load_gaussian(g, means, quats, scales);
    float v_M[6], v_m;
    if (!pair_backward_cov(A, G.L, amplitudes[g], p, v_c, v_w, v_M, v_m)) continue;
    projected_factor_vjp(A, G.L, p, v_M, static_cast<float*>(nullptr), acc);
    mean2d_vjp(A, G.mu, p, v_u, static_cast<float*>(nullptr), acc, acc + 6);
  }
  // Warp reduction, then one fixed-order sum over warps.
  GM_UNROLL
  for (int k = 0; k < NPOSE; ++k) {
    float v = acc[k];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    acc[k] = v;
  }
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) {
    GM_UNROLL
    for (int k = 0; k < NPOSE; ++k) red[warp][k] = acc[k];
  }
  __syncthreads();
  if (tid != 0) return;
  float tot[NPOSE];
  GM_UNROLL
  for (int k = 0; k < NPOSE; ++k) {
    float sum = red[0][k];
    for (int w = 1; w < POSE_THREADS / 32; ++w) sum += red[w][k];
    tot[k] = sum;
  }
  GM_UNROLL
  for (int k = 0; k < 6; ++k) v_rotations[9 * b + k] = tot[k];
  GM_UNROLL
  for (int k = 6; k < 9; ++k) v_rotations[9 * b + k] = 0.f;  // row 2 of A does not enter the projection
  v_shifts[2 * b] = tot[6];
  v_shifts[2 * b + 1] = tot[7];
}

}  // namespace

void launch_preprocess_fwd(int64_t B, int64_t N, int D, float pixel_size, float cutoff, const float* means,
                           const float* quats, const float* scales, const float* amplitudes, const float* rotations,
                           const float* shifts, float* means2d, float* conics, float* weights, float* radii,
                           int32_t* tile_counts, cudaStream_t stream) {
  const int64_t pairs = B * N;
  if (pairs == 0) return;
  const int64_t blocks = (pairs + FWD_THREADS - 1) / FWD_THREADS;
  preprocess_fwd_kernel<<<static_cast<unsigned int>(blocks), FWD_THREADS, 0, stream>>>(
      B, N, D, pixel_size, cutoff, means, quats, scales, amplitudes, rotations, shifts, means2d, conics, weights,
      radii, tile_counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_preprocess_bwd(int64_t B, int64_t N, float pixel_size, const float* means, const float* quats,
                           const float* scales, const float* amplitudes, const float* rotations,
                           const float* v_means2d, const float* v_conics, const float* v_weights, float* v_means,
                           float* v_quats, float* v_scales, float* v_amplitudes, float* v_rotations,
                           float* v_shifts, cudaStream_t stream) {
  if (v_means != nullptr && N > 0) {
    const int64_t blocks = (N + GX - 1) / GX;
    preprocess_bwd_gauss_kernel<<<static_cast<unsigned int>(blocks), dim3(GX, BY), 0, stream>>>(
        B, N, pixel_size, means, quats, scales, amplitudes, rotations, v_means2d, v_conics, v_weights, v_means,
        v_quats, v_scales, v_amplitudes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (v_rotations != nullptr && B > 0) {
    preprocess_bwd_pose_kernel<<<static_cast<unsigned int>(B), POSE_THREADS, 0, stream>>>(
        B, N, pixel_size, means, quats, scales, amplitudes, rotations, v_means2d, v_conics, v_weights, v_rotations,
        v_shifts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cryogs

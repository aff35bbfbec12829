// Kernel launchers: raw device pointers in, launches on the given stream (the caller passes
// at::cuda::getCurrentCUDAStream()). Each launcher skips zero-size launches and checks the launch
// with C10_CUDA_KERNEL_LAUNCH_CHECK(). Shapes are given at every pointer; all float data is float32,
// row-major and contiguous. Host wrappers (the .cpp files) validate tensors before calling these.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace cryogs {

// preprocess_kernel.cu ----------------------------------------------------------------------------
// One thread per (b, g): 2D centre, conic, weight, radii and tile count.
void launch_preprocess_fwd(int64_t B, int64_t N, int D, float pixel_size, float cutoff,
                           const float* means,       // [N, 3]
                           const float* quats,       // [N, 4]
                           const float* scales,      // [N, 3]
                           const float* amplitudes,  // [N]
                           const float* rotations,   // [B, 3, 3]
                           const float* shifts,      // [B, 2]
                           float* means2d,           // [B, N, 2] out
                           float* conics,            // [B, N, 3] out
                           float* weights,           // [B, N]    out
                           float* radii,             // [B, N, 2] out
                           int32_t* tile_counts,     // [B, N]    out
                           cudaStream_t stream);

// Backward stage B: if v_means is not null, per-Gaussian reduction over images (v_means ..
// v_amplitudes, written, not accumulated) and, if v_rotations is not null, per-image reduction over
// Gaussians (v_rotations, v_shifts, written).
void launch_preprocess_bwd(int64_t B, int64_t N, float pixel_size,
                           const float* means,       // [N, 3]
                           const float* quats,       // [N, 4]
                           const float* scales,      // [N, 3]
                           const float* amplitudes,  // [N]
                           const float* rotations,   // [B, 3, 3]
                           const float* v_means2d,   // [B, N, 2]
                           const float* v_conics,    // [B, N, 3]
                           const float* v_weights,   // [B, N]
                           float* v_means,           // [N, 3] out, or null (no Gaussian gradients)
                           float* v_quats,           // [N, 4] out, or null
                           float* v_scales,          // [N, 3] out, or null
                           float* v_amplitudes,      // [N]    out, or null
                           float* v_rotations,       // [B, 3, 3] out, or null (no pose gradients)
                           float* v_shifts,          // [B, 2]    out, or null
                           cudaStream_t stream);

// bin_kernel.cu -----------------------------------------------------------------------------------
// Writes one (key = b*T + tile, value = g) per covered tile of each pair, b-major, into
// keys[offsets[i] - counts[i] .. offsets[i]) for pair i = b*N + g; never at or beyond M.
void launch_duplicate(int64_t B, int64_t N, int D, int tiles_x,
                      const float* means2d,        // [B, N, 2]
                      const float* radii,          // [B, N, 2]
                      const int32_t* tile_counts,  // [B, N]
                      const int64_t* offsets,      // [B*N] inclusive prefix sum of tile_counts
                      int64_t M,                   // offsets[B*N - 1], the number of instances
                      uint32_t* keys,              // [M] out
                      int32_t* values,             // [M] out
                      cudaStream_t stream);

// CUB radix sort of (keys, values) over bits [0, end_bit), stable, ping-ponging between the two
// buffers of each pair. With temp == null, only sets temp_bytes. Returns the index (0 or 1) of the
// buffer that holds the sorted result.
int sort_pairs(void* temp, size_t& temp_bytes,
               uint32_t* keys0, uint32_t* keys1,     // [M] each
               int32_t* values0, int32_t* values1,   // [M] each
               int64_t M, int end_bit, cudaStream_t stream);

// ranges[k] = [first, last+1) of key k in the sorted keys; ranges must be zeroed beforehand (empty).
void launch_tile_ranges(int64_t M, uint64_t num_keys,  // num_keys = B*T
                        const uint32_t* sorted_keys,  // [M]
                        int64_t* ranges,              // [B*T, 2] out
                        cudaStream_t stream);

// rasterize_fwd_kernel.cu -------------------------------------------------------------------------
// One block per (b, tile); every pixel of out is written exactly once.
void launch_rasterize_fwd(int64_t B, int64_t N, int D, int tiles_x, float cutoff,
                          const float* means2d,    // [B, N, 2]
                          const float* conics,     // [B, N, 3]
                          const float* weights,    // [B, N]
                          const int64_t* ranges,   // [B*T, 2]
                          const int32_t* gids,     // [M] Gaussian index per sorted instance
                          float* out,              // [B, D, D] out
                          cudaStream_t stream);

// rasterize_bwd_kernel.cu -------------------------------------------------------------------------
// Backward stage A: per-instance pixel loops, atomics into the (zeroed or partial) 2D gradients.
void launch_rasterize_bwd(int64_t B, int64_t N, int D, int tiles_x, float cutoff,
                          const float* means2d,    // [B, N, 2]
                          const float* conics,     // [B, N, 3]
                          const float* weights,    // [B, N]
                          const float* radii,      // [B, N, 2]
                          const int64_t* ranges,   // [B*T, 2]
                          const int32_t* gids,     // [M]
                          const float* v_image,    // [B, D, D]
                          float* v_means2d,        // [B, N, 2] accumulated
                          float* v_conics,         // [B, N, 3] accumulated
                          float* v_weights,        // [B, N]    accumulated
                          cudaStream_t stream);

// voxelize_kernel.cu ------------------------------------------------------------------------------
// One block per Gaussian and slab of 8 z-planes of its box, atomics into the (zeroed) volume V[z, y, x].
void launch_voxelize_fwd(int64_t N, int D, float pixel_size, float cutoff,
                         const float* means,       // [N, 3]
                         const float* quats,       // [N, 4]
                         const float* scales,      // [N, 3]
                         const float* amplitudes,  // [N]
                         float* volume,            // [D, D, D] accumulated
                         cudaStream_t stream);

}  // namespace cryogs

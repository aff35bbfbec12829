// Binning: duplicate each pair once per covered tile, radix-sort by (image, tile), tile ranges.
#include <c10/cuda/CUDAException.h>
#include <cub/device/device_radix_sort.cuh>

#include "gaussian_math.cuh"
#include "kernels.h"

namespace cryogs {

namespace {

constexpr int THREADS = 256;

// Pair i = b*N + g writes its instances at [offsets[i] - tile_counts[i], offsets[i]), tiles in
// row-major order (y, then x). The tile rectangle comes from the same tile_rect() as the count in
// preprocess, on the same stored float values, so it yields exactly tile_counts[i] instances; the
// writes are nevertheless bounded by the pair's slot and by M (the host's count, not re-read).
__global__ void duplicate_kernel(int64_t B, int64_t N, int D, int tiles_x,
                                 const float* __restrict__ means2d,        // [B, N, 2]
                                 const float* __restrict__ radii,          // [B, N, 2]
                                 const int32_t* __restrict__ tile_counts,  // [B, N]
                                 const int64_t* __restrict__ offsets,      // [B*N]
                                 int64_t M,
                                 uint32_t* __restrict__ keys,              // [M]
                                 int32_t* __restrict__ values) {           // [M]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int32_t count = tile_counts[i];
  if (count <= 0) return;
  const int64_t b = i / N;
  const int32_t g = static_cast<int32_t>(i % N);
  Rect pix, tiles;
  if (!tile_rect(means2d[2 * i], means2d[2 * i + 1], radii[2 * i], radii[2 * i + 1], D, TILE_SIZE, pix, tiles)) return;
  int64_t o = offsets[i] - count;
  const int64_t end = offsets[i] < M ? offsets[i] : M;
  const uint32_t base = static_cast<uint32_t>(b) * static_cast<uint32_t>(tiles_x * tiles_x);
  for (int ty = tiles.y0; ty <= tiles.y1; ++ty) {
    for (int tx = tiles.x0; tx <= tiles.x1; ++tx) {
      if (o >= end) return;
      keys[o] = base + static_cast<uint32_t>(ty * tiles_x + tx);
      values[o] = g;
      ++o;
    }
  }
}

__global__ void tile_ranges_kernel(int64_t M, uint64_t num_keys,
                                   const uint32_t* __restrict__ keys,  // [M], sorted
                                   int64_t* __restrict__ ranges) {     // [num_keys, 2]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const uint32_t k = keys[i];
  if (k >= num_keys) return;  // cannot happen for well-formed input; never write out of bounds
  if (i == 0 || keys[i - 1] != k) ranges[2 * static_cast<int64_t>(k)] = i;
  if (i == M - 1 || keys[i + 1] != k) ranges[2 * static_cast<int64_t>(k) + 1] = i + 1;
}

}  // namespace

void launch_duplicate(int64_t B, int64_t N, int D, int tiles_x, const float* means2d, const float* radii,
                      const int32_t* tile_counts, const int64_t* offsets, int64_t M, uint32_t* keys,
                      int32_t* values, cudaStream_t stream) {
  const int64_t pairs = B * N;
  if (pairs == 0) return;
  const int64_t blocks = (pairs + THREADS - 1) / THREADS;
  duplicate_kernel<<<static_cast<unsigned int>(blocks), THREADS, 0, stream>>>(B, N, D, tiles_x, means2d, radii,
                                                                              tile_counts, offsets, M, keys, values);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int sort_pairs(void* temp, size_t& temp_bytes, uint32_t* keys0, uint32_t* keys1, int32_t* values0,
               int32_t* values1, int64_t M, int end_bit, cudaStream_t stream) {
  cub::DoubleBuffer<uint32_t> d_keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> d_values(values0, values1);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, d_keys, d_values, M, 0, end_bit, stream));
  return d_keys.selector;
}

void launch_tile_ranges(int64_t M, uint64_t num_keys, const uint32_t* sorted_keys, int64_t* ranges,
                        cudaStream_t stream) {
  if (M == 0) return;
  const int64_t blocks = (M + THREADS - 1) / THREADS;
  tile_ranges_kernel<<<static_cast<unsigned int>(blocks), THREADS, 0, stream>>>(M, num_keys, sorted_keys, ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cryogs

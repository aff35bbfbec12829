// Host wrapper of the binning op: count (from preprocess) -> int64 scan -> duplicate -> CUB radix
// sort over only the key bits in use -> tile ranges. Scratch memory comes from PyTorch's caching
// allocator and everything runs on the current stream, without a host synchronisation: the
// instance count M that sizes the buffers is the caller's (cuda_backend reads the per-image totals
// back once per forward, to plan its sub-batches), not read back from the scan again.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "kernels.h"

namespace cryogs {

std::vector<at::Tensor> bin_instances(const at::Tensor& means2d, const at::Tensor& radii,
                                      const at::Tensor& tile_counts, int64_t box_size, int64_t instances) {
  const char* op = "bin_instances";
  TORCH_CHECK(means2d.defined() && means2d.dim() == 3, "cryogs.", op, ": means2d must have shape [B, N, 2]");
  const int64_t B = means2d.size(0), N = means2d.size(1);
  check_tensor(op, "means2d", means2d, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "radii", radii, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "tile_counts", tile_counts, {B, N}, at::kInt, true);
  check_same_device(op, means2d, {radii, tile_counts});
  check_geometry(op, box_size, 1.0, 0.0);
  const int64_t tiles_x = tiles_per_side(box_size);
  const int64_t T = tiles_x * tiles_x;
  // Keys b*T + tile are 32-bit, and the rasterizer launches one block per key.
  TORCH_CHECK(B * T <= int64_t(0x7fffffff), "cryogs.", op, ": B * tiles = ", B, " * ", T,
              " exceeds 2^31 - 1; split the batch of images");
  const c10::cuda::CUDAGuard guard(means2d.device());
  const auto i32 = means2d.options().dtype(at::kInt);
  const int64_t M = instances;
  TORCH_CHECK(M >= 0, "cryogs.", op, ": negative instance count ", M);
  // CUB's sort takes an int item count.
  TORCH_CHECK(M <= int64_t(0x7fffffff), "cryogs.", op, ": ", M, " instances in one batch exceed 2^31 - 1; "
              "lower the instance budget or the number of images per call");
  at::Tensor ranges = at::zeros({B, T, 2}, means2d.options().dtype(at::kLong));  // empty = [0, 0)
  if (B * N == 0) {
    TORCH_CHECK(M == 0, "cryogs.", op, ": ", M, " instances of no pairs");
    return {ranges, at::empty({0}, i32), at::empty({0}, i32)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Inclusive int64 prefix sum of the per-pair tile counts (on the current stream).
  const at::Tensor offsets = at::cumsum(tile_counts.view({-1}), 0, at::kLong);
  if (debug_poison()) {  // debug mode only: this check synchronises
    const int64_t total = offsets[-1].item<int64_t>();
    TORCH_CHECK(total == M, "cryogs.", op, ": instances = ", M, " but the tile counts sum to ", total);
  }
  if (M == 0) return {ranges, at::empty({0}, i32), at::empty({0}, i32)};
  // Separate buffers, so the returned sorted arrays keep only their own storage alive.
  at::Tensor keys0 = alloc_out({M}, i32), keys1 = alloc_out({M}, i32);
  at::Tensor vals0 = alloc_out({M}, i32), vals1 = alloc_out({M}, i32);
  auto* k0 = reinterpret_cast<uint32_t*>(keys0.data_ptr<int32_t>());
  auto* k1 = reinterpret_cast<uint32_t*>(keys1.data_ptr<int32_t>());
  launch_duplicate(B, N, static_cast<int>(box_size), static_cast<int>(tiles_x), means2d.data_ptr<float>(),
                   radii.data_ptr<float>(), tile_counts.data_ptr<int32_t>(), offsets.data_ptr<int64_t>(), M, k0,
                   vals0.data_ptr<int32_t>(), stream);
  // Sort only the bits that keys < B*T can have.
  int end_bit = 1;
  while (end_bit < 32 && ((uint64_t(1) << end_bit) < static_cast<uint64_t>(B * T))) ++end_bit;
  size_t temp_bytes = 0;
  sort_pairs(nullptr, temp_bytes, k0, k1, vals0.data_ptr<int32_t>(), vals1.data_ptr<int32_t>(), M, end_bit, stream);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes) + 1}, means2d.options().dtype(at::kByte));
  const int sel = sort_pairs(temp.data_ptr(), temp_bytes, k0, k1, vals0.data_ptr<int32_t>(),
                             vals1.data_ptr<int32_t>(), M, end_bit, stream);
  at::Tensor keys = sel == 0 ? keys0 : keys1;
  at::Tensor gids = sel == 0 ? vals0 : vals1;
  launch_tile_ranges(M, static_cast<uint64_t>(B * T), reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>()),
                     ranges.data_ptr<int64_t>(), stream);
  return {ranges, keys, gids};
}

}  // namespace cryogs

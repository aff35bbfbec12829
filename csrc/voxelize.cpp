// Host wrapper of the voxelizer (forward only).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "kernels.h"

namespace cryogs {

at::Tensor voxelize_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                        const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff) {
  const char* op = "voxelize_fwd";
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  const int64_t N = means.size(0), D = box_size;
  check_geometry(op, box_size, pixel_size, cutoff);
  TORCH_CHECK(box_size <= 2048, "cryogs.", op, ": box_size must be <= 2048 for a volume, got ", box_size);
  check_tensor(op, "means", means, {N, 3}, at::kFloat, true);
  check_tensor(op, "quats", quats, {N, 4}, at::kFloat, true);
  check_tensor(op, "scales", scales, {N, 3}, at::kFloat, true);
  check_tensor(op, "amplitudes", amplitudes, {N}, at::kFloat, true);
  check_same_device(op, means, {quats, scales, amplitudes});
  TORCH_CHECK(N < (int64_t(1) << 31), "cryogs.", op, ": at most 2^31 - 1 Gaussians, got ", N);
  const c10::cuda::CUDAGuard guard(means.device());
  at::Tensor volume = at::zeros({D, D, D}, means.options());  // accumulated into
  launch_voxelize_fwd(N, static_cast<int>(D), static_cast<float>(pixel_size), static_cast<float>(cutoff),
                      means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(),
                      amplitudes.data_ptr<float>(), volume.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  return volume;
}

}  // namespace cryogs

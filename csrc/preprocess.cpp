// Host wrappers of the preprocess op (forward, and backward stage B).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "kernels.h"

namespace cryogs {

namespace {

void check_gaussians(const char* op, const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                     const at::Tensor& amplitudes, const at::Tensor& rotations) {
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  TORCH_CHECK(rotations.defined() && rotations.dim() == 3, "cryogs.", op, ": rotations must have shape [B, 3, 3]");
  const int64_t N = means.size(0), B = rotations.size(0);
  check_tensor(op, "means", means, {N, 3}, at::kFloat, true);
  check_tensor(op, "quats", quats, {N, 4}, at::kFloat, true);
  check_tensor(op, "scales", scales, {N, 3}, at::kFloat, true);
  check_tensor(op, "amplitudes", amplitudes, {N}, at::kFloat, true);
  check_tensor(op, "rotations", rotations, {B, 3, 3}, at::kFloat, true);
  check_same_device(op, means, {quats, scales, amplitudes, rotations});
  TORCH_CHECK(N < (int64_t(1) << 31), "cryogs.", op, ": at most 2^31 - 1 Gaussians, got ", N);
  TORCH_CHECK(B * N < (int64_t(1) << 39), "cryogs.", op, ": too many (image, Gaussian) pairs: ", B, " x ", N);
}

}  // namespace

std::vector<at::Tensor> preprocess_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                       const at::Tensor& amplitudes, const at::Tensor& rotations,
                                       const at::Tensor& shifts, int64_t box_size, double pixel_size, double cutoff) {
  const char* op = "preprocess_fwd";
  check_gaussians(op, means, quats, scales, amplitudes, rotations);
  check_geometry(op, box_size, pixel_size, cutoff);
  const int64_t N = means.size(0), B = rotations.size(0);
  check_tensor(op, "shifts", shifts, {B, 2}, at::kFloat, true);
  check_same_device(op, means, {shifts});
  const c10::cuda::CUDAGuard guard(means.device());
  const auto f32 = means.options();
  at::Tensor means2d = alloc_out({B, N, 2}, f32);
  at::Tensor conics = alloc_out({B, N, 3}, f32);
  at::Tensor weights = alloc_out({B, N}, f32);
  at::Tensor radii = alloc_out({B, N, 2}, f32);
  at::Tensor tile_counts = alloc_out({B, N}, f32.dtype(at::kInt));
  launch_preprocess_fwd(B, N, static_cast<int>(box_size), static_cast<float>(pixel_size), static_cast<float>(cutoff),
                        means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(),
                        amplitudes.data_ptr<float>(), rotations.data_ptr<float>(), shifts.data_ptr<float>(),
                        means2d.data_ptr<float>(), conics.data_ptr<float>(), weights.data_ptr<float>(),
                        radii.data_ptr<float>(), tile_counts.data_ptr<int32_t>(),
                        c10::cuda::getCurrentCUDAStream().stream());
  return {means2d, conics, weights, radii, tile_counts};
}

std::vector<at::Tensor> preprocess_bwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                       const at::Tensor& amplitudes, const at::Tensor& rotations,
                                       const at::Tensor& v_means2d, const at::Tensor& v_conics,
                                       const at::Tensor& v_weights, double pixel_size, bool pose_grads,
                                       bool gauss_grads) {
  const char* op = "preprocess_bwd";
  check_gaussians(op, means, quats, scales, amplitudes, rotations);
  check_geometry(op, 1, pixel_size, 0.0);
  const int64_t N = means.size(0), B = rotations.size(0);
  check_tensor(op, "v_means2d", v_means2d, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "v_conics", v_conics, {B, N, 3}, at::kFloat, true);
  check_tensor(op, "v_weights", v_weights, {B, N}, at::kFloat, true);
  check_same_device(op, means, {v_means2d, v_conics, v_weights});
  const c10::cuda::CUDAGuard guard(means.device());
  const auto f32 = means.options();
  // Undefined (None in Python) when not asked for: pose refinement skips the per-Gaussian pass.
  at::Tensor v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts;
  if (gauss_grads) {
    v_means = alloc_out({N, 3}, f32);
    v_quats = alloc_out({N, 4}, f32);
    v_scales = alloc_out({N, 3}, f32);
    v_amplitudes = alloc_out({N}, f32);
  }
  if (pose_grads) {
    v_rotations = alloc_out({B, 3, 3}, f32);
    v_shifts = alloc_out({B, 2}, f32);
  }
  launch_preprocess_bwd(B, N, static_cast<float>(pixel_size), means.data_ptr<float>(), quats.data_ptr<float>(),
                        scales.data_ptr<float>(), amplitudes.data_ptr<float>(), rotations.data_ptr<float>(),
                        v_means2d.data_ptr<float>(), v_conics.data_ptr<float>(), v_weights.data_ptr<float>(),
                        gauss_grads ? v_means.data_ptr<float>() : nullptr,
                        gauss_grads ? v_quats.data_ptr<float>() : nullptr,
                        gauss_grads ? v_scales.data_ptr<float>() : nullptr,
                        gauss_grads ? v_amplitudes.data_ptr<float>() : nullptr,
                        pose_grads ? v_rotations.data_ptr<float>() : nullptr,
                        pose_grads ? v_shifts.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  return {v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts};
}

}  // namespace cryogs

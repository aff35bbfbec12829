// Host wrappers of the rasterizer: forward (one write per pixel) and backward stage A.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "kernels.h"

namespace cryogs {

namespace {

// Checks the pair tensors and the binning of one batch; returns tiles_x.
int64_t check_binned(const char* op, const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                     const at::Tensor& tile_ranges, const at::Tensor& gids, int64_t box_size, double cutoff) {
  TORCH_CHECK(means2d.defined() && means2d.dim() == 3, "cryogs.", op, ": means2d must have shape [B, N, 2]");
  const int64_t B = means2d.size(0), N = means2d.size(1);
  check_geometry(op, box_size, 1.0, cutoff);
  const int64_t tiles_x = tiles_per_side(box_size);
  const int64_t T = tiles_x * tiles_x;
  check_tensor(op, "means2d", means2d, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "conics", conics, {B, N, 3}, at::kFloat, true);
  check_tensor(op, "weights", weights, {B, N}, at::kFloat, true);
  check_tensor(op, "tile_ranges", tile_ranges, {B, T, 2}, at::kLong, true);
  check_tensor(op, "gids", gids, {-1}, at::kInt, true);
  check_same_device(op, means2d, {conics, weights, tile_ranges, gids});
  TORCH_CHECK(B * T <= int64_t(0x7fffffff), "cryogs.", op, ": B * tiles exceeds 2^31 - 1");
  return tiles_x;
}

}  // namespace

at::Tensor rasterize_fwd(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                         const at::Tensor& tile_ranges, const at::Tensor& gids, int64_t box_size, double cutoff,
                         c10::optional<at::Tensor> out_opt) {
  const char* op = "rasterize_fwd";
  const int64_t tiles_x = check_binned(op, means2d, conics, weights, tile_ranges, gids, box_size, cutoff);
  const int64_t B = means2d.size(0), N = means2d.size(1), D = box_size;
  const c10::cuda::CUDAGuard guard(means2d.device());
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    check_tensor(op, "out", out, {B, D, D}, at::kFloat, true);
    check_same_device(op, means2d, {out});
    maybe_poison(out);
  } else {
    out = alloc_out({B, D, D}, means2d.options());
  }
  launch_rasterize_fwd(B, N, static_cast<int>(D), static_cast<int>(tiles_x), static_cast<float>(cutoff),
                       means2d.data_ptr<float>(), conics.data_ptr<float>(), weights.data_ptr<float>(),
                       tile_ranges.data_ptr<int64_t>(), gids.data_ptr<int32_t>(), out.data_ptr<float>(),
                       c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

void rasterize_bwd(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                   const at::Tensor& radii, const at::Tensor& tile_ranges, const at::Tensor& gids,
                   const at::Tensor& v_image, int64_t box_size, double cutoff, at::Tensor v_means2d,
                   at::Tensor v_conics, at::Tensor v_weights) {
  const char* op = "rasterize_bwd";
  const int64_t tiles_x = check_binned(op, means2d, conics, weights, tile_ranges, gids, box_size, cutoff);
  const int64_t B = means2d.size(0), N = means2d.size(1), D = box_size;
  check_tensor(op, "radii", radii, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "v_image", v_image, {B, D, D}, at::kFloat, true);
  check_tensor(op, "v_means2d", v_means2d, {B, N, 2}, at::kFloat, true);
  check_tensor(op, "v_conics", v_conics, {B, N, 3}, at::kFloat, true);
  check_tensor(op, "v_weights", v_weights, {B, N}, at::kFloat, true);
  check_same_device(op, means2d, {radii, v_image, v_means2d, v_conics, v_weights});
  const c10::cuda::CUDAGuard guard(means2d.device());
  launch_rasterize_bwd(B, N, static_cast<int>(D), static_cast<int>(tiles_x), static_cast<float>(cutoff),
                       means2d.data_ptr<float>(), conics.data_ptr<float>(), weights.data_ptr<float>(),
                       radii.data_ptr<float>(), tile_ranges.data_ptr<int64_t>(), gids.data_ptr<int32_t>(),
                       v_image.data_ptr<float>(), v_means2d.data_ptr<float>(), v_conics.data_ptr<float>(),
                       v_weights.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace cryogs

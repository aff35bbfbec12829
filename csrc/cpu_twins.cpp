// CPU twins of the CUDA ops: plain host loops over the very same gaussian_math.cuh functions the
// kernels call, in float32 or float64. They exist so the hand-derived maths (and the tile
// rectangles) are tested against PyTorch autograd without a GPU; they are not meant to be fast.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "gaussian_math.cuh"

namespace cryogs {

namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                     at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "cryogs.", op, ": ", name,
              " must be float32 or float64, got ", dtype);
  check_tensor(op, name, t, shape, dtype, false);
}

template <typename T>
void copy_n(const T* src, int n, T* dst) {
  for (int k = 0; k < n; ++k) dst[k] = src[k];
}

// ---- preprocess ---------------------------------------------------------------------------------
template <typename T>
void preprocess_fwd_impl(int64_t B, int64_t N, int D, T p, T cutoff, const T* means, const T* quats, const T* scales,
                         const T* amplitudes, const T* rotations, const T* shifts, T* means2d, T* conics, T* weights,
                         T* radii, int32_t* tile_counts) {
  for (int64_t g = 0; g < N; ++g) {
    const Gaussian<T> G = load_gaussian(g, means, quats, scales);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = b * N + g;
      T A[9], t[2];
      copy_n(rotations + 9 * b, 9, A);
      copy_n(shifts + 2 * b, 2, t);
      const PairFwd<T> f = pair_forward(A, t, G.mu, G.L, amplitudes[g], p, static_cast<T>(D / 2), cutoff);
      copy_n(f.u, 2, means2d + 2 * i);
      copy_n(f.conic, 3, conics + 3 * i);
      weights[i] = f.w;
      copy_n(f.radii, 2, radii + 2 * i);
      tile_counts[i] = tile_count(f.ok, f.u[0], f.u[1], f.radii[0], f.radii[1], D, TILE_SIZE);
    }
  }
}

// Same reductions as the two stage-B kernels (per Gaussian over images; per image over Gaussians).
template <typename T>
void preprocess_bwd_impl(int64_t B, int64_t N, T p, const T* means, const T* quats, const T* scales,
                         const T* amplitudes, const T* rotations, const T* v_means2d, const T* v_conics,
                         const T* v_weights, T* v_means, T* v_quats, T* v_scales, T* v_amplitudes, T* v_rotations,
                         T* v_shifts) {
  if (v_rotations) {
    for (int64_t k = 0; k < 9 * B; ++k) v_rotations[k] = T(0);
    for (int64_t k = 0; k < 2 * B; ++k) v_shifts[k] = T(0);
  }
  for (int64_t g = 0; g < N; ++g) {
    const Gaussian<T> G = load_gaussian(g, means, quats, scales);
    T acc[13] = {};
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = b * N + g;
      T v_u[2], v_c[3];
      copy_n(v_means2d + 2 * i, 2, v_u);
      copy_n(v_conics + 3 * i, 3, v_c);
      const T v_w = v_weights[i];
      if (v_u[0] == T(0) && v_u[1] == T(0) && v_c[0] == T(0) && v_c[1] == T(0) && v_c[2] == T(0) && v_w == T(0)) {
        continue;
      }
      T A[9], v_M[6], v_m;
      copy_n(rotations + 9 * b, 9, A);
      if (!pair_backward_cov(A, G.L, amplitudes[g], p, v_c, v_w, v_M, v_m)) continue;
      T* v_A = v_rotations ? v_rotations + 9 * b : nullptr;
      T* v_t = v_rotations ? v_shifts + 2 * b : nullptr;
      projected_factor_vjp(A, G.L, p, v_M, acc, v_A);
      mean2d_vjp(A, G.mu, p, v_u, acc + 9, v_A, v_t);
      acc[12] += v_m;
    }
    T v_s[3], v_q[4];
    load_gaussian_vjp(G, acc, v_q, v_s);
    copy_n(acc + 9, 3, v_means + 3 * g);
    copy_n(v_s, 3, v_scales + 3 * g);
    copy_n(v_q, 4, v_quats + 4 * g);
    v_amplitudes[g] = acc[12];
  }
}

// ---- rasterize ----------------------------------------------------------------------------------
// Calls f(b, pair, x0, x1, y0, y1) for every pixel block a pair is evaluated on: the whole image
// (brute force) or, with tile counts, each covered tile (whole tile for the forward, as the GPU
// forward does; the pair's box inside the tile for the backward, as stage A does).
template <typename T, typename F>
void for_each_block(int64_t B, int64_t N, int D, const T* means2d, const T* radii, const int32_t* tile_counts,
                    bool box_only, F f) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < N; ++g) {
      const int64_t i = b * N + g;
      if (tile_counts == nullptr) {
        f(i, 0, D - 1, 0, D - 1);
        continue;
      }
      if (tile_counts[i] <= 0) continue;
      Rect pix, tiles;
      if (!tile_rect(means2d[2 * i], means2d[2 * i + 1], radii[2 * i], radii[2 * i + 1], D, TILE_SIZE, pix, tiles)) {
        continue;
      }
      int32_t visited = 0;
      for (int ty = tiles.y0; ty <= tiles.y1; ++ty) {
        for (int tx = tiles.x0; tx <= tiles.x1; ++tx) {
          ++visited;
          int x0 = tx * TILE_SIZE, x1 = std::min(D - 1, x0 + TILE_SIZE - 1);
          int y0 = ty * TILE_SIZE, y1 = std::min(D - 1, y0 + TILE_SIZE - 1);
          if (box_only) {
            x0 = std::max(x0, pix.x0);
            x1 = std::min(x1, pix.x1);
            y0 = std::max(y0, pix.y0);
            y1 = std::min(y1, pix.y1);
          }
          f(i, x0, x1, y0, y1);
        }
      }
      TORCH_CHECK(visited == tile_counts[i], "cryogs: tile count mismatch for pair ", i, ": ", tile_counts[i],
                  " counted, ", visited, " in the rectangle");
    }
  }
}

template <typename T>
void rasterize_fwd_impl(int64_t B, int64_t N, int D, T cutoff, const T* means2d, const T* conics, const T* weights,
                        const T* radii, const int32_t* tile_counts, T* out) {
  // Brute force uses the plain form w exp(-q/2), q <= k^2; the tiled path the kernels' prescaled form.
  const T k2 = cutoff * cutoff, k2s = scaled_cutoff(cutoff);
  const bool plain = tile_counts == nullptr;
  for_each_block(B, N, D, means2d, radii, tile_counts, false, [&](int64_t i, int x0, int x1, int y0, int y1) {
    const int64_t b = i / N;
    const T* conic = conics + 3 * i;
    const ScaledConic<T> sc = scale_conic(conic);
    const T ux = means2d[2 * i], uy = means2d[2 * i + 1], w = weights[i];
    for (int y = y0; y <= y1; ++y) {
      for (int x = x0; x <= x1; ++x) {
        const T dx = T(x) - ux, dy = T(y) - uy;
        out[(b * D + y) * D + x] += plain ? eval_pixel(conic, w, dx, dy, k2) : w * eval_scaled(sc, dx, dy, k2s);
      }
    }
  });
}

template <typename T>
void rasterize_bwd_impl(int64_t B, int64_t N, int D, T cutoff, const T* means2d, const T* conics, const T* weights,
                        const T* radii, const int32_t* tile_counts, const T* v_image, T* v_means2d, T* v_conics,
                        T* v_weights) {
  const T k2 = cutoff * cutoff, k2s = scaled_cutoff(cutoff);
  const bool plain = tile_counts == nullptr;
  for_each_block(B, N, D, means2d, radii, tile_counts, true, [&](int64_t i, int x0, int x1, int y0, int y1) {
    const int64_t b = i / N;
    const T* conic = conics + 3 * i;
    const ScaledConic<T> sc = scale_conic(conic);
    const T ux = means2d[2 * i], uy = means2d[2 * i + 1];
    PixelMoments<T> mo;
    mo.zero();
    for (int y = y0; y <= y1; ++y) {
      for (int x = x0; x <= x1; ++x) {
        const T dx = T(x) - ux, dy = T(y) - uy;
        const T e = plain ? eval_pixel(conic, T(1), dx, dy, k2) : eval_scaled(sc, dx, dy, k2s);
        mo.add(v_image[(b * D + y) * D + x] * e, dx, dy);
      }
    }
    T v_u[2], v_c[3], v_w;
    finalize_moments(mo, conic, weights[i], v_u, v_c, v_w);
    v_means2d[2 * i] += v_u[0];
    v_means2d[2 * i + 1] += v_u[1];
    for (int k = 0; k < 3; ++k) v_conics[3 * i + k] += v_c[k];
    v_weights[i] += v_w;
  });
}

// ---- voxelize -----------------------------------------------------------------------------------
template <typename T>
void voxelize_impl(int64_t N, int D, T p, T cutoff, const T* means, const T* quats, const T* scales,
                   const T* amplitudes, bool use_box, T* volume) {
  const T k2 = cutoff * cutoff;
  for (int64_t g = 0; g < N; ++g) {
    const VoxelGauss<T> vg = voxel_setup(means + 3 * g, quats + 4 * g, scales + 3 * g, amplitudes[g], p,
                                         static_cast<T>(D / 2), cutoff);
    if (!vg.ok) continue;
    int lo[3] = {0, 0, 0}, hi[3] = {D - 1, D - 1, D - 1};
    bool empty = false;
    if (use_box) {
      for (int k = 0; k < 3; ++k) empty = empty || !axis_span(vg.c[k], vg.radii[k], D, lo[k], hi[k]);
    }
    if (empty) continue;
    for (int z = lo[2]; z <= hi[2]; ++z) {
      for (int y = lo[1]; y <= hi[1]; ++y) {
        for (int x = lo[0]; x <= hi[0]; ++x) {
          volume[(int64_t(z) * D + y) * D + x] += voxel_eval(vg, T(x) - vg.c[0], T(y) - vg.c[1], T(z) - vg.c[2], k2);
        }
      }
    }
  }
}

void check_pairs_cpu(const char* op, const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                     const at::Tensor& radii, const c10::optional<at::Tensor>& tile_counts, int64_t box_size,
                     double cutoff) {
  TORCH_CHECK(means2d.defined() && means2d.dim() == 3, "cryogs.", op, ": means2d must have shape [B, N, 2]");
  const int64_t B = means2d.size(0), N = means2d.size(1);
  const auto dt = means2d.scalar_type();
  check_geometry(op, box_size, 1.0, cutoff);
  check_float_cpu(op, "means2d", means2d, {B, N, 2}, dt);
  check_float_cpu(op, "conics", conics, {B, N, 3}, dt);
  check_float_cpu(op, "weights", weights, {B, N}, dt);
  check_float_cpu(op, "radii", radii, {B, N, 2}, dt);
  if (tile_counts.has_value() && tile_counts->defined()) {
    check_tensor(op, "tile_counts", *tile_counts, {B, N}, at::kInt, false);
  }
}

const int32_t* counts_ptr(const c10::optional<at::Tensor>& tile_counts) {
  return tile_counts.has_value() && tile_counts->defined() ? tile_counts->data_ptr<int32_t>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> preprocess_fwd_cpu(const at::Tensor& means, const at::Tensor& quats,
                                           const at::Tensor& scales, const at::Tensor& amplitudes,
                                           const at::Tensor& rotations, const at::Tensor& shifts, int64_t box_size,
                                           double pixel_size, double cutoff) {
  const char* op = "preprocess_fwd_cpu";
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  TORCH_CHECK(rotations.defined() && rotations.dim() == 3, "cryogs.", op, ": rotations must have shape [B, 3, 3]");
  check_geometry(op, box_size, pixel_size, cutoff);
  const int64_t N = means.size(0), B = rotations.size(0);
  const auto dt = means.scalar_type();
  check_float_cpu(op, "means", means, {N, 3}, dt);
  check_float_cpu(op, "quats", quats, {N, 4}, dt);
  check_float_cpu(op, "scales", scales, {N, 3}, dt);
  check_float_cpu(op, "amplitudes", amplitudes, {N}, dt);
  check_float_cpu(op, "rotations", rotations, {B, 3, 3}, dt);
  check_float_cpu(op, "shifts", shifts, {B, 2}, dt);
  const auto opt = means.options();
  at::Tensor means2d = alloc_out({B, N, 2}, opt), conics = alloc_out({B, N, 3}, opt);
  at::Tensor weights = alloc_out({B, N}, opt), radii = alloc_out({B, N, 2}, opt);
  at::Tensor tile_counts = alloc_out({B, N}, opt.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_twin", [&] {
    preprocess_fwd_impl<scalar_t>(B, N, static_cast<int>(box_size), static_cast<scalar_t>(pixel_size),
                                  static_cast<scalar_t>(cutoff), means.data_ptr<scalar_t>(),
                                  quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
                                  amplitudes.data_ptr<scalar_t>(), rotations.data_ptr<scalar_t>(),
                                  shifts.data_ptr<scalar_t>(), means2d.data_ptr<scalar_t>(),
                                  conics.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                                  radii.data_ptr<scalar_t>(), tile_counts.data_ptr<int32_t>());
  });
  return {means2d, conics, weights, radii, tile_counts};
}

std::vector<at::Tensor> preprocess_bwd_cpu(const at::Tensor& means, const at::Tensor& quats,
                                           const at::Tensor& scales, const at::Tensor& amplitudes,
                                           const at::Tensor& rotations, const at::Tensor& v_means2d,
                                           const at::Tensor& v_conics, const at::Tensor& v_weights,
                                           double pixel_size, bool pose_grads) {
  const char* op = "preprocess_bwd_cpu";
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  TORCH_CHECK(rotations.defined() && rotations.dim() == 3, "cryogs.", op, ": rotations must have shape [B, 3, 3]");
  check_geometry(op, 1, pixel_size, 0.0);
  const int64_t N = means.size(0), B = rotations.size(0);
  const auto dt = means.scalar_type();
  check_float_cpu(op, "means", means, {N, 3}, dt);
  check_float_cpu(op, "quats", quats, {N, 4}, dt);
  check_float_cpu(op, "scales", scales, {N, 3}, dt);
  check_float_cpu(op, "amplitudes", amplitudes, {N}, dt);
  check_float_cpu(op, "rotations", rotations, {B, 3, 3}, dt);
  check_float_cpu(op, "v_means2d", v_means2d, {B, N, 2}, dt);
  check_float_cpu(op, "v_conics", v_conics, {B, N, 3}, dt);
  check_float_cpu(op, "v_weights", v_weights, {B, N}, dt);
  const auto opt = means.options();
  at::Tensor v_means = alloc_out({N, 3}, opt), v_quats = alloc_out({N, 4}, opt);
  at::Tensor v_scales = alloc_out({N, 3}, opt), v_amplitudes = alloc_out({N}, opt);
  at::Tensor v_rotations, v_shifts;
  if (pose_grads) {
    v_rotations = alloc_out({B, 3, 3}, opt);
    v_shifts = alloc_out({B, 2}, opt);
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_twin", [&] {
    preprocess_bwd_impl<scalar_t>(
        B, N, static_cast<scalar_t>(pixel_size), means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
        scales.data_ptr<scalar_t>(), amplitudes.data_ptr<scalar_t>(), rotations.data_ptr<scalar_t>(),
        v_means2d.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(), v_weights.data_ptr<scalar_t>(),
        v_means.data_ptr<scalar_t>(), v_quats.data_ptr<scalar_t>(), v_scales.data_ptr<scalar_t>(),
        v_amplitudes.data_ptr<scalar_t>(), pose_grads ? v_rotations.data_ptr<scalar_t>() : nullptr,
        pose_grads ? v_shifts.data_ptr<scalar_t>() : nullptr);
  });
  return {v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts};
}

at::Tensor rasterize_fwd_cpu(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                             const at::Tensor& radii, const c10::optional<at::Tensor>& tile_counts, int64_t box_size,
                             double cutoff) {
  const char* op = "rasterize_fwd_cpu";
  check_pairs_cpu(op, means2d, conics, weights, radii, tile_counts, box_size, cutoff);
  const int64_t B = means2d.size(0), N = means2d.size(1), D = box_size;
  at::Tensor out = at::zeros({B, D, D}, means2d.options());
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "cryogs_cpu_twin", [&] {
    rasterize_fwd_impl<scalar_t>(B, N, static_cast<int>(D), static_cast<scalar_t>(cutoff),
                                 means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                                 weights.data_ptr<scalar_t>(), radii.data_ptr<scalar_t>(), counts_ptr(tile_counts),
                                 out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> rasterize_bwd_cpu(const at::Tensor& means2d, const at::Tensor& conics,
                                          const at::Tensor& weights, const at::Tensor& radii,
                                          const c10::optional<at::Tensor>& tile_counts, const at::Tensor& v_image,
                                          int64_t box_size, double cutoff) {
  const char* op = "rasterize_bwd_cpu";
  check_pairs_cpu(op, means2d, conics, weights, radii, tile_counts, box_size, cutoff);
  const int64_t B = means2d.size(0), N = means2d.size(1), D = box_size;
  check_float_cpu(op, "v_image", v_image, {B, D, D}, means2d.scalar_type());
  at::Tensor v_means2d = at::zeros({B, N, 2}, means2d.options());
  at::Tensor v_conics = at::zeros({B, N, 3}, means2d.options());
  at::Tensor v_weights = at::zeros({B, N}, means2d.options());
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "cryogs_cpu_twin", [&] {
    rasterize_bwd_impl<scalar_t>(B, N, static_cast<int>(D), static_cast<scalar_t>(cutoff),
                                 means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                                 weights.data_ptr<scalar_t>(), radii.data_ptr<scalar_t>(), counts_ptr(tile_counts),
                                 v_image.data_ptr<scalar_t>(), v_means2d.data_ptr<scalar_t>(),
                                 v_conics.data_ptr<scalar_t>(), v_weights.data_ptr<scalar_t>());
  });
  return {v_means2d, v_conics, v_weights};
}

at::Tensor voxelize_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                        const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff,
                        bool use_box) {
  const char* op = "voxelize_cpu";
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  check_geometry(op, box_size, pixel_size, cutoff);
  const int64_t N = means.size(0), D = box_size;
  const auto dt = means.scalar_type();
  check_float_cpu(op, "means", means, {N, 3}, dt);
  check_float_cpu(op, "quats", quats, {N, 4}, dt);
  check_float_cpu(op, "scales", scales, {N, 3}, dt);
  check_float_cpu(op, "amplitudes", amplitudes, {N}, dt);
  at::Tensor volume = at::zeros({D, D, D}, means.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_twin", [&] {
    voxelize_impl<scalar_t>(N, static_cast<int>(D), static_cast<scalar_t>(pixel_size), static_cast<scalar_t>(cutoff),
                            means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
                            amplitudes.data_ptr<scalar_t>(), use_box, volume.data_ptr<scalar_t>());
  });
  return volume;
}

}  // namespace cryogs

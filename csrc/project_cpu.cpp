// The `cpu` backend of cryogs.project: preprocess, rasterize forward and backward on CPU threads
// (OpenMP), on the per-Gaussian maths of gaussian_math.cuh, the functions the CUDA kernels call.
//
// Forward, cpu_project_fwd:
//   1. per Gaussian (parallel over g): R(q) and L = R diag(s)                       [load_gaussian]
//   2. per pair i = b*N + g (parallel over pairs): centre, conic, weight, radii     [pair_forward]
//      and the pixel box of the cutoff ellipse                                       [pixel_rect]
//      (kept for the backward, as rects [B, N, 4] = x0, x1, y0, y1, empty when x0 > x1)
//   3. per (image, slab of rows) (parallel): each pair whose box meets the slab is added into the
//      slab, Gaussians in ascending g, so every pixel is summed in the order of the CUDA
//      rasterizer (ascending g within a tile) whatever the slab split or the number of threads.
//      The inner loop runs over whole vectors of W pixels of one box row, masked to the box, into
//      a slab buffer whose rows are padded by W columns: no scalar remainder, no branch per pixel.
// Loops hand out work dynamically (chunks of pairs, slabs, Gaussians, images): on a shared machine a
// thread that loses its core then delays the others less.
// Backward, cpu_project_bwd (bitwise deterministic: no atomics, every sum in a fixed order):
//   A. per pair (parallel): the six PixelMoments of dL/dI over its box (kept per vector lane, the
//      lanes summed in a fixed order), then finalize_moments -> v_u, v_conic, v_w, written to the
//      pair's own slot of a [B, N, 6] buffer;
//   B. per Gaussian (parallel over g, images in order) and per image (parallel over b, Gaussians in
//      order): the reductions of the CUDA stage-B kernels (pair_backward_cov, projected_factor_vjp,
//      mean2d_vjp, load_gaussian_vjp). Each pass runs only if its parameters need gradients.
// Compute is in the dtype of the inputs: float32 (as the CUDA kernels) or float64 (exact tests).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_simd.h"
#include "gaussian_math.cuh"

namespace cryogs {

namespace {

constexpr int W = 8;  // pixels per vector step of the inner loops (one AVX2 register of floats)

// Columns of a padded row: a box row starting at x0 <= D - 1 is covered by whole vectors ending
// before x0 + ((D - 1 - x0) / W + 1) * W <= D - 1 + W.
inline int padded(int D) { return D + W; }

// Number of pixels the vector loop covers for a box row x0..x1 (a multiple of W).
inline int vector_span(int x0, int x1) { return ((x1 - x0) / W + 1) * W; }

// ---- step 1 and 2: preprocess ---------------------------------------------------------------------
template <typename T>
__attribute__((always_inline)) inline void preprocess_range_impl(
    int64_t i0, int64_t i1, int64_t N, int D, T p, T cutoff,
    const Gaussian<T>* __restrict__ gauss,  // [N] R, L per Gaussian
    const T* __restrict__ amplitudes,       // [N]
    const T* __restrict__ rotations,        // [B, 3, 3]
    const T* __restrict__ shifts,           // [B, 2]
    T* __restrict__ means2d,                // [B, N, 2] out
    T* __restrict__ conics,                 // [B, N, 3] out
    T* __restrict__ weights,                // [B, N]    out
    int32_t* __restrict__ rects) {          // [B, N, 4] out: x0, x1, y0, y1 (inclusive pixels)
  const T c0 = static_cast<T>(D / 2);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / N, g = i % N;
    const Gaussian<T>& G = gauss[g];
    const PairFwd<T> f = pair_forward(rotations + 9 * b, shifts + 2 * b, G.mu, G.L, amplitudes[g], p, c0, cutoff);
    means2d[2 * i] = f.u[0];
    means2d[2 * i + 1] = f.u[1];
    conics[3 * i] = f.conic[0];
    conics[3 * i + 1] = f.conic[1];
    conics[3 * i + 2] = f.conic[2];
    weights[i] = f.w;
    Rect r;
    if (!(f.ok && pixel_rect(f.u[0], f.u[1], f.radii[0], f.radii[1], D, r))) r = Rect{0, -1, 0, -1};
    rects[4 * i] = r.x0;
    rects[4 * i + 1] = r.x1;
    rects[4 * i + 2] = r.y0;
    rects[4 * i + 3] = r.y1;
  }
}

CRYOGS_CPU_CLONES void preprocess_range(int64_t i0, int64_t i1, int64_t N, int D, float p, float cutoff,
                                        const Gaussian<float>* gauss, const float* amplitudes,
                                        const float* rotations, const float* shifts, float* means2d, float* conics,
                                        float* weights, int32_t* rects) {
  preprocess_range_impl<float>(i0, i1, N, D, p, cutoff, gauss, amplitudes, rotations, shifts, means2d, conics,
                               weights, rects);
}

void preprocess_range(int64_t i0, int64_t i1, int64_t N, int D, double p, double cutoff,
                      const Gaussian<double>* gauss, const double* amplitudes, const double* rotations,
                      const double* shifts, double* means2d, double* conics, double* weights, int32_t* rects) {
  preprocess_range_impl<double>(i0, i1, N, D, p, cutoff, gauss, amplitudes, rotations, shifts, means2d, conics,
                                weights, rects);
}

// Step 2 over all pairs i = b*N + g, in chunks of consecutive pairs.
template <typename T>
void preprocess_pairs(int64_t B, int64_t N, int D, T p, T cutoff, const Gaussian<T>* gauss, const T* amplitudes,
                      const T* rotations, const T* shifts, T* means2d, T* conics, T* weights, int32_t* rects) {
  const int64_t pairs = B * N;
  constexpr int64_t CHUNK = 1024;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i0 = 0; i0 < pairs; i0 += CHUNK) {
    preprocess_range(i0, std::min(pairs, i0 + CHUNK), N, D, p, cutoff, gauss, amplitudes, rotations, shifts, means2d,
                     conics, weights, rects);
  }
}

template <typename T>
std::vector<Gaussian<T>> load_gaussians(int64_t N, const T* means, const T* quats, const T* scales) {
  std::vector<Gaussian<T>> gauss(static_cast<size_t>(N));
  // ~10 ns a Gaussian: threads only pay off for many (each parallel region is a barrier, which costs
  // most when another process holds a core)
#pragma omp parallel for schedule(static) if (N >= 16384)
  for (int64_t g = 0; g < N; ++g) gauss[g] = load_gaussian(g, means, quats, scales);
  return gauss;
}

// ---- step 3: rasterize forward --------------------------------------------------------------------
// Adds the pairs of one image into its rows ylo..yhi, held in buf (row ylo first, Dp columns).
template <typename T>
__attribute__((always_inline)) inline void splat_rows_impl(int64_t N, int Dp, T k2s, int ylo, int yhi,
                                                           const T* __restrict__ means2d,   // [N, 2] of image b
                                                           const T* __restrict__ conics,    // [N, 3]
                                                           const T* __restrict__ weights,   // [N]
                                                           const int32_t* __restrict__ rects,  // [N, 4]
                                                           T* __restrict__ buf) {  // [yhi - ylo + 1, Dp]
  for (int64_t g = 0; g < N; ++g) {
    const int32_t* r = rects + 4 * g;
    const int x0 = r[0], x1 = r[1];
    const int y0 = std::max(r[2], ylo), y1 = std::min(r[3], yhi);
    if (x0 > x1 || y0 > y1) continue;
    const ScaledConic<T> sc = scale_conic(conics + 3 * g);
    const T ux = means2d[2 * g], uy = means2d[2 * g + 1], w = weights[g];
    const int nx = vector_span(x0, x1);
    for (int y = y0; y <= y1; ++y) {
      const T dy = static_cast<T>(y) - uy;
      T* __restrict__ row = buf + static_cast<int64_t>(y - ylo) * Dp + x0;
#pragma omp simd
      for (int j = 0; j < nx; ++j) {
        const int x = x0 + j;
        row[j] += w * eval_scaled_vec(sc, static_cast<T>(x) - ux, dy, k2s, x <= x1);
      }
    }
  }
}

CRYOGS_CPU_CLONES void splat_rows(int64_t N, int Dp, float k2s, int ylo, int yhi, const float* means2d,
                                  const float* conics, const float* weights, const int32_t* rects, float* buf) {
  splat_rows_impl<float>(N, Dp, k2s, ylo, yhi, means2d, conics, weights, rects, buf);
}

void splat_rows(int64_t N, int Dp, double k2s, int ylo, int yhi, const double* means2d, const double* conics,
                const double* weights, const int32_t* rects, double* buf) {
  splat_rows_impl<double>(N, Dp, k2s, ylo, yhi, means2d, conics, weights, rects, buf);
}

template <typename T>
void rasterize_fwd(int64_t B, int64_t N, int D, T cutoff,
                   const T* means2d,       // [B, N, 2]
                   const T* conics,        // [B, N, 3]
                   const T* weights,       // [B, N]
                   const int32_t* rects,   // [B, N, 4]
                   T* out) {               // [B, D, D] out, every pixel written once
  if (B == 0) return;
  const int Dp = padded(D);
  const int64_t tiles_y = tiles_per_side(D);
  // Slabs of whole tiles: as tall as fit ~32 KiB (the slab stays in L1 while the image's pairs are
  // added), and enough of them to give every thread work when there are few images.
  int64_t rows = std::max<int64_t>(TILE_SIZE, (8192 / Dp) / TILE_SIZE * TILE_SIZE);
  int64_t slabs = (D + rows - 1) / rows;
  const int64_t want = (2 * cpu_max_threads() + B - 1) / B;
  if (slabs < want) {
    slabs = std::min<int64_t>(tiles_y, want);
    rows = (tiles_y + slabs - 1) / slabs * TILE_SIZE;
    slabs = (D + rows - 1) / rows;
  }
  const T k2s = scaled_cutoff(cutoff);
#pragma omp parallel
  {
    std::vector<T> buf(static_cast<size_t>(rows * Dp));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * slabs; ++item) {
      const int64_t b = item / slabs;
      const int ylo = static_cast<int>((item % slabs) * rows);
      const int yhi = static_cast<int>(std::min<int64_t>(D, ylo + rows)) - 1;
      std::fill(buf.begin(), buf.end(), T(0));
      splat_rows(N, Dp, k2s, ylo, yhi, means2d + 2 * b * N, conics + 3 * b * N, weights + b * N, rects + 4 * b * N,
                 buf.data());
      for (int y = ylo; y <= yhi; ++y) {
        std::copy_n(buf.data() + static_cast<int64_t>(y - ylo) * Dp, D, out + (b * D + y) * D);
      }
    }
  }
}

// ---- backward stage A -------------------------------------------------------------------------
// Per-pair gradients (v_u[2], v_conic[3], v_w) of the pairs i0..i1-1 from the padded dL/dI.
template <typename T>
__attribute__((always_inline)) inline void pair_grads_impl(int64_t i0, int64_t i1, int64_t N, int D, int Dp, T k2s,
                                                           const T* __restrict__ means2d,   // [B, N, 2]
                                                           const T* __restrict__ conics,    // [B, N, 3]
                                                           const T* __restrict__ weights,   // [B, N]
                                                           const int32_t* __restrict__ rects,  // [B, N, 4]
                                                           const T* __restrict__ v_padded,  // [B, D, Dp]
                                                           T* __restrict__ v_pairs) {       // [B, N, 6] out
  for (int64_t i = i0; i < i1; ++i) {
    T* out = v_pairs + 6 * i;
    const int32_t* r = rects + 4 * i;
    const int x0 = r[0], x1 = r[1], y0 = r[2], y1 = r[3];
    if (x0 > x1 || y0 > y1) {
      for (int k = 0; k < 6; ++k) out[k] = T(0);
      continue;
    }
    const T* conic = conics + 3 * i;
    const ScaledConic<T> sc = scale_conic(conic);
    const T ux = means2d[2 * i], uy = means2d[2 * i + 1];
    const T* v_img = v_padded + (i / N) * D * static_cast<int64_t>(Dp);
    const int nx = vector_span(x0, x1);
    // PixelMoments::add, kept per vector lane over the whole box (one register per moment, no
    // horizontal sum per row), then the lanes summed in a fixed order.
    T s0[W] = {}, sx[W] = {}, sy[W] = {}, sxx[W] = {}, sxy[W] = {}, syy[W] = {};
    for (int y = y0; y <= y1; ++y) {
      const T dy = static_cast<T>(y) - uy;
      for (int c = 0; c < nx; c += W) {
        const T* __restrict__ vec = v_img + static_cast<int64_t>(y) * Dp + x0 + c;  // pixels x0 + c ..
#pragma omp simd
        for (int l = 0; l < W; ++l) {
          const int x = x0 + c + l;
          const T dx = static_cast<T>(x) - ux;
          const T ge = vec[l] * eval_scaled_vec(sc, dx, dy, k2s, x <= x1);
          const T gx = ge * dx, gy = ge * dy;
          s0[l] += ge;
          sx[l] += gx;
          sy[l] += gy;
          sxx[l] += gx * dx;
          sxy[l] += gx * dy;
          syy[l] += gy * dy;
        }
      }
    }
    PixelMoments<T> mo;
    mo.zero();
    for (int l = 0; l < W; ++l) {
      mo.s0 += s0[l];
      mo.sx += sx[l];
      mo.sy += sy[l];
      mo.sxx += sxx[l];
      mo.sxy += sxy[l];
      mo.syy += syy[l];
    }
    T v_u[2], v_c[3], v_w;
    finalize_moments(mo, conic, weights[i], v_u, v_c, v_w);
    out[0] = v_u[0];
    out[1] = v_u[1];
    out[2] = v_c[0];
    out[3] = v_c[1];
    out[4] = v_c[2];
    out[5] = v_w;
  }
}

CRYOGS_CPU_CLONES void pair_grads(int64_t i0, int64_t i1, int64_t N, int D, int Dp, float k2s, const float* means2d,
                                  const float* conics, const float* weights, const int32_t* rects,
                                  const float* v_padded, float* v_pairs) {
  pair_grads_impl<float>(i0, i1, N, D, Dp, k2s, means2d, conics, weights, rects, v_padded, v_pairs);
}

void pair_grads(int64_t i0, int64_t i1, int64_t N, int D, int Dp, double k2s, const double* means2d,
                const double* conics, const double* weights, const int32_t* rects, const double* v_padded,
                double* v_pairs) {
  pair_grads_impl<double>(i0, i1, N, D, Dp, k2s, means2d, conics, weights, rects, v_padded, v_pairs);
}

// Stage A over all pairs, in chunks of consecutive pairs (one image's, mostly).
template <typename T>
void all_pair_grads(int64_t B, int64_t N, int D, T cutoff,
                    const T* means2d,      // [B, N, 2]
                    const T* conics,       // [B, N, 3]
                    const T* weights,      // [B, N]
                    const int32_t* rects,  // [B, N, 4]
                    const T* v_padded,     // [B, D, Dp]
                    T* v_pairs) {          // [B, N, 6] out
  const int64_t pairs = B * N;
  constexpr int64_t CHUNK = 256;
  const T k2s = scaled_cutoff(cutoff);
  const int Dp = padded(D);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i0 = 0; i0 < pairs; i0 += CHUNK) {
    pair_grads(i0, std::min(pairs, i0 + CHUNK), N, D, Dp, k2s, means2d, conics, weights, rects, v_padded, v_pairs);
  }
}

// Loads pair i's (v_u, v_conic, v_w); false if all zero (nothing to add, and an invalid pair's NaN
// intermediates must not turn into NaN gradients).
template <typename T>
inline bool load_pair_grads(const T* v_pairs, int64_t i, T v_u[2], T v_c[3], T& v_w) {
  const T* v = v_pairs + 6 * i;
  v_u[0] = v[0];
  v_u[1] = v[1];
  v_c[0] = v[2];
  v_c[1] = v[3];
  v_c[2] = v[4];
  v_w = v[5];
  return v[0] != T(0) || v[1] != T(0) || v[2] != T(0) || v[3] != T(0) || v[4] != T(0) || v[5] != T(0);
}

// ---- backward stage B -------------------------------------------------------------------------
template <typename T>
void gauss_grads(int64_t B, int64_t N, T p,
                 const Gaussian<T>* gauss,  // [N]
                 const T* amplitudes,       // [N]
                 const T* rotations,        // [B, 3, 3]
                 const T* v_pairs,          // [B, N, 6]
                 T* v_means,                // [N, 3] out
                 T* v_quats,                // [N, 4] out
                 T* v_scales,               // [N, 3] out
                 T* v_amplitudes) {         // [N]    out
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t g = 0; g < N; ++g) {
    const Gaussian<T>& G = gauss[g];
    T acc[13] = {};  // v_L (9), v_mu (3), v_m
    for (int64_t b = 0; b < B; ++b) {
      T v_u[2], v_c[3], v_w;
      if (!load_pair_grads(v_pairs, b * N + g, v_u, v_c, v_w)) continue;
      const T* A = rotations + 9 * b;
      T v_M[6], v_m;
      if (!pair_backward_cov(A, G.L, amplitudes[g], p, v_c, v_w, v_M, v_m)) continue;
      projected_factor_vjp(A, G.L, p, v_M, acc, static_cast<T*>(nullptr));
      mean2d_vjp(A, G.mu, p, v_u, acc + 9, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
      acc[12] += v_m;
    }
    T v_s[3], v_q[4];
    load_gaussian_vjp(G, acc, v_q, v_s);
    for (int k = 0; k < 3; ++k) {
      v_means[3 * g + k] = acc[9 + k];
      v_scales[3 * g + k] = v_s[k];
    }
    for (int k = 0; k < 4; ++k) v_quats[4 * g + k] = v_q[k];
    v_amplitudes[g] = acc[12];
  }
}

template <typename T>
void pose_grads(int64_t B, int64_t N, T p,
                const Gaussian<T>* gauss,  // [N]
                const T* amplitudes,       // [N]
                const T* rotations,        // [B, 3, 3]
                const T* v_pairs,          // [B, N, 6]
                T* v_rotations,            // [B, 3, 3] out
                T* v_shifts) {             // [B, 2]    out
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    const T* A = rotations + 9 * b;
    T acc[8] = {};  // v_A rows 0-1 (6), v_t (2)
    for (int64_t g = 0; g < N; ++g) {
      T v_u[2], v_c[3], v_w;
      if (!load_pair_grads(v_pairs, b * N + g, v_u, v_c, v_w)) continue;
      const Gaussian<T>& G = gauss[g];
      T v_M[6], v_m;
      if (!pair_backward_cov(A, G.L, amplitudes[g], p, v_c, v_w, v_M, v_m)) continue;
      projected_factor_vjp(A, G.L, p, v_M, static_cast<T*>(nullptr), acc);
      mean2d_vjp(A, G.mu, p, v_u, static_cast<T*>(nullptr), acc, acc + 6);
    }
    for (int k = 0; k < 6; ++k) v_rotations[9 * b + k] = acc[k];
    for (int k = 6; k < 9; ++k) v_rotations[9 * b + k] = T(0);  // row 2 of A does not enter the projection
    v_shifts[2 * b] = acc[6];
    v_shifts[2 * b + 1] = acc[7];
  }
}

// ---- validation ---------------------------------------------------------------------------------
at::ScalarType check_gaussians_cpu(const char* op, const at::Tensor& means, const at::Tensor& quats,
                                   const at::Tensor& scales, const at::Tensor& amplitudes) {
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  const at::ScalarType dt = means.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "cryogs.", op, ": means must be float32 or float64, got ", dt);
  const int64_t N = means.size(0);
  check_tensor(op, "means", means, {N, 3}, dt, false);
  check_tensor(op, "quats", quats, {N, 4}, dt, false);
  check_tensor(op, "scales", scales, {N, 3}, dt, false);
  check_tensor(op, "amplitudes", amplitudes, {N}, dt, false);
  TORCH_CHECK(N < (int64_t(1) << 31), "cryogs.", op, ": at most 2^31 - 1 Gaussians, got ", N);
  return dt;
}

}  // namespace

std::vector<at::Tensor> cpu_project_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const at::Tensor& amplitudes, const at::Tensor& rotations,
                                        const at::Tensor& shifts, int64_t box_size, double pixel_size,
                                        double cutoff) {
  const char* op = "cpu_project_fwd";
  const at::ScalarType dt = check_gaussians_cpu(op, means, quats, scales, amplitudes);
  check_geometry(op, box_size, pixel_size, cutoff);
  TORCH_CHECK(rotations.defined() && rotations.dim() == 3, "cryogs.", op, ": rotations must have shape [B, 3, 3]");
  const int64_t N = means.size(0), B = rotations.size(0), D = box_size;
  check_tensor(op, "rotations", rotations, {B, 3, 3}, dt, false);
  check_tensor(op, "shifts", shifts, {B, 2}, dt, false);
  const auto opt = means.options();
  at::Tensor images = alloc_out({B, D, D}, opt);
  at::Tensor means2d = alloc_out({B, N, 2}, opt);
  at::Tensor conics = alloc_out({B, N, 3}, opt);
  at::Tensor weights = alloc_out({B, N}, opt);
  at::Tensor rects = alloc_out({B, N, 4}, opt.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_project_fwd", [&] {
    using T = scalar_t;
    const std::vector<Gaussian<T>> gauss =
        load_gaussians<T>(N, means.data_ptr<T>(), quats.data_ptr<T>(), scales.data_ptr<T>());
    preprocess_pairs<T>(B, N, static_cast<int>(D), static_cast<T>(pixel_size), static_cast<T>(cutoff), gauss.data(),
                        amplitudes.data_ptr<T>(), rotations.data_ptr<T>(), shifts.data_ptr<T>(),
                        means2d.data_ptr<T>(), conics.data_ptr<T>(), weights.data_ptr<T>(), rects.data_ptr<int32_t>());
    rasterize_fwd<T>(B, N, static_cast<int>(D), static_cast<T>(cutoff), means2d.data_ptr<T>(), conics.data_ptr<T>(),
                     weights.data_ptr<T>(), rects.data_ptr<int32_t>(), images.data_ptr<T>());
  });
  return {images, means2d, conics, weights, rects};
}

std::vector<at::Tensor> cpu_project_bwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const at::Tensor& amplitudes, const at::Tensor& rotations,
                                        const at::Tensor& means2d, const at::Tensor& conics,
                                        const at::Tensor& weights, const at::Tensor& rects,
                                        const at::Tensor& v_images, int64_t box_size, double pixel_size,
                                        double cutoff, bool pose_grads_on, bool gauss_grads_on) {
  const char* op = "cpu_project_bwd";
  const at::ScalarType dt = check_gaussians_cpu(op, means, quats, scales, amplitudes);
  check_geometry(op, box_size, pixel_size, cutoff);
  TORCH_CHECK(rotations.defined() && rotations.dim() == 3, "cryogs.", op, ": rotations must have shape [B, 3, 3]");
  const int64_t N = means.size(0), B = rotations.size(0), D = box_size;
  check_tensor(op, "rotations", rotations, {B, 3, 3}, dt, false);
  check_tensor(op, "means2d", means2d, {B, N, 2}, dt, false);
  check_tensor(op, "conics", conics, {B, N, 3}, dt, false);
  check_tensor(op, "weights", weights, {B, N}, dt, false);
  check_tensor(op, "rects", rects, {B, N, 4}, at::kInt, false);
  check_tensor(op, "v_images", v_images, {B, D, D}, dt, false);
  const auto opt = means.options();
  // Undefined (None in Python) when not asked for: pose refinement skips the per-Gaussian pass.
  at::Tensor v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts;
  if (gauss_grads_on) {
    v_means = alloc_out({N, 3}, opt);
    v_quats = alloc_out({N, 4}, opt);
    v_scales = alloc_out({N, 3}, opt);
    v_amplitudes = alloc_out({N}, opt);
  }
  if (pose_grads_on) {
    v_rotations = alloc_out({B, 3, 3}, opt);
    v_shifts = alloc_out({B, 2}, opt);
  }
  if (!gauss_grads_on && !pose_grads_on) return {v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts};
  const int Dp = padded(static_cast<int>(D));
  // dL/dI with rows padded by W zero columns, so whole-vector loops never read past a row.
  at::Tensor v_padded = at::zeros({B, D, Dp}, opt);
  v_padded.narrow(2, 0, D).copy_(v_images);
  at::Tensor v_pairs = at::empty({B, N, 6}, opt);  // (v_u, v_conic, v_w) per pair, every slot written
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_project_bwd", [&] {
    using T = scalar_t;
    all_pair_grads<T>(B, N, static_cast<int>(D), static_cast<T>(cutoff), means2d.data_ptr<T>(),
                      conics.data_ptr<T>(), weights.data_ptr<T>(), rects.data_ptr<int32_t>(), v_padded.data_ptr<T>(),
                      v_pairs.data_ptr<T>());
    const std::vector<Gaussian<T>> gauss =
        load_gaussians<T>(N, means.data_ptr<T>(), quats.data_ptr<T>(), scales.data_ptr<T>());
    const T p = static_cast<T>(pixel_size);
    if (gauss_grads_on) {
      gauss_grads<T>(B, N, p, gauss.data(), amplitudes.data_ptr<T>(), rotations.data_ptr<T>(), v_pairs.data_ptr<T>(),
                     v_means.data_ptr<T>(), v_quats.data_ptr<T>(), v_scales.data_ptr<T>(),
                     v_amplitudes.data_ptr<T>());
    }
    if (pose_grads_on) {
      pose_grads<T>(B, N, p, gauss.data(), amplitudes.data_ptr<T>(), rotations.data_ptr<T>(), v_pairs.data_ptr<T>(),
                    v_rotations.data_ptr<T>(), v_shifts.data_ptr<T>());
    }
  });
  return {v_means, v_quats, v_scales, v_amplitudes, v_rotations, v_shifts};
}

bool cpu_has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int64_t cpu_num_threads() { return cpu_max_threads(); }

}  // namespace cryogs

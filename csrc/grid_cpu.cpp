// Trilinear gridding of Fourier samples onto a backprojection's padded Hermitian half grid (the
// inner loop of cryogs.reconstruct.backproject.accumulate): sample s at grid position k_s (x >= 0,
// in grid units) adds values_s times the trilinear weight of each of its 8 neighbouring voxels,
// with y and z periodic over Dp and x not (the half grid holds kx = 0 .. Dp/2, and every sample
// lies strictly inside Nyquist, so x + 1 <= Dp/2).
//
// Threads own contiguous ranges of z-planes: each reads every sample and adds only into its own
// planes, so there are no races, no atomics and no per-thread copies of the grid, and every voxel
// receives its contributions in sample order: the result is bitwise the same for any thread count.
#include <ATen/Dispatch.h>

#include <cmath>

#include "common.h"
#include "cpu_simd.h"

namespace cryogs {

void cpu_grid_trilinear(const at::Tensor& sums, const at::Tensor& k, const at::Tensor& values, int64_t Dp) {
  const char* op = "cpu_grid_trilinear";
  TORCH_CHECK(Dp >= 2 && Dp % 2 == 0, "cryogs.", op, ": Dp must be even and >= 2, got ", Dp);
  TORCH_CHECK(k.defined() && k.dim() == 2, "cryogs.", op, ": k must have shape [n, 3]");
  TORCH_CHECK(values.defined() && values.dim() == 2, "cryogs.", op, ": values must have shape [n, C]");
  const int64_t n = k.size(0), C = values.size(1), nx = Dp / 2 + 1;
  check_tensor(op, "k", k, {n, 3}, at::kDouble, false);
  check_tensor(op, "values", values, {n, C}, at::kDouble, false);
  check_tensor(op, "sums", sums, {Dp * Dp * nx, C}, at::kDouble, false);
  const double* kp = k.data_ptr<double>();       // [n, 3] (x, y, z)
  const double* vp = values.data_ptr<double>();  // [n, C]
  double* out = sums.data_ptr<double>();         // [Dp, Dp, nx, C] (z, y, x)
  int bad = 0;
#pragma omp parallel reduction(| : bad)
  {
#ifdef _OPENMP
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t T = 1, t = 0;
#endif
    const int64_t z_lo = Dp * t / T, z_hi = Dp * (t + 1) / T;  // this thread's planes [z_lo, z_hi)
    for (int64_t s = 0; s < n; ++s) {
      const double* q = kp + 3 * s;
      const double x0 = std::floor(q[0]), y0 = std::floor(q[1]), z0 = std::floor(q[2]);
      const double fx = q[0] - x0, fy = q[1] - y0, fz = q[2] - z0;
      const int64_t ix = static_cast<int64_t>(x0);
      if (!(ix >= 0 && ix + 1 < nx && std::fabs(y0) <= Dp && std::fabs(z0) <= Dp)) {
        bad = 1;  // outside the half grid: the caller's bug, reported after the loop
        continue;
      }
      const int64_t iy = static_cast<int64_t>(y0), iz = static_cast<int64_t>(z0);
      const double wx[2] = {1 - fx, fx}, wy[2] = {1 - fy, fy}, wz[2] = {1 - fz, fz};
      const double* v = vp + C * s;
      for (int dz = 0; dz < 2; ++dz) {
        const int64_t z = ((iz + dz) % Dp + Dp) % Dp;
        if (z < z_lo || z >= z_hi) continue;
        for (int dy = 0; dy < 2; ++dy) {
          const int64_t y = ((iy + dy) % Dp + Dp) % Dp;
          double* row = out + ((z * Dp + y) * nx + ix) * C;
          const double w_zy = wz[dz] * wy[dy];
          for (int dx = 0; dx < 2; ++dx) {
            const double w = w_zy * wx[dx];
            for (int64_t c = 0; c < C; ++c) row[dx * C + c] += w * v[c];
          }
        }
      }
    }
  }
  TORCH_CHECK(!bad, "cryogs.", op, ": a sample lies outside the half grid (x must be in [0, Dp/2 - 1), "
              "|y| and |z| at most Dp)");
}

}  // namespace cryogs

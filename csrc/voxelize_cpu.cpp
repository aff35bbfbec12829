// The `cpu` voxelizer of cryogs.voxelize (forward only): V[z, y, x] = sum_g density_g exp(-q/2) over
// the voxels of each Gaussian's cutoff box with q <= k^2, the maths of voxel_setup / voxel_q in
// gaussian_math.cuh and the box of axis_span, as in the CUDA voxelizer.
//   1. per Gaussian (parallel over g): voxel_setup and the box (empty for an invalid Gaussian);
//   2. per z-plane (parallel over z): every Gaussian whose box meets the plane is added into it, in
//      ascending g, so the result is bitwise the same for any number of threads. The inner loop runs
//      over whole vectors of W voxels of one box row, masked to the box, into a row-padded buffer.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu_simd.h"
#include "gaussian_math.cuh"

namespace cryogs {

namespace {

constexpr int W = 8;  // voxels per vector step

template <typename T>
struct VoxelBox {
  VoxelGauss<T> vg;
  int lo[3], hi[3];  // inclusive voxel bounds (x, y, z); lo[0] > hi[0] when empty
};

// Adds every Gaussian meeting plane z into buf (D rows of Dp columns).
template <typename T>
__attribute__((always_inline)) inline void voxel_plane_impl(int64_t N, int D, int Dp, T k2, int z,
                                                            const VoxelBox<T>* __restrict__ boxes,  // [N]
                                                            T* __restrict__ buf) {  // [D, Dp]
  for (int64_t g = 0; g < N; ++g) {
    const VoxelBox<T>& bx = boxes[g];
    if (bx.lo[0] > bx.hi[0] || z < bx.lo[2] || z > bx.hi[2]) continue;
    const VoxelGauss<T> vg = bx.vg;  // a local copy: its fields stay in registers
    const int x0 = bx.lo[0], x1 = bx.hi[0];
    const int nx = ((x1 - x0) / W + 1) * W;
    const T dz = static_cast<T>(z) - vg.c[2];
    for (int y = bx.lo[1]; y <= bx.hi[1]; ++y) {
      const T dy = static_cast<T>(y) - vg.c[1];
      T* __restrict__ row = buf + static_cast<int64_t>(y) * Dp + x0;
#pragma omp simd
      for (int j = 0; j < nx; ++j) {
        const int x = x0 + j;
        const T q = voxel_q(vg, static_cast<T>(x) - vg.c[0], dy, dz);
        // voxel_eval with exp(-q/2) = exp2(-q log2(e) / 2), vectorisable
        const T e = exp2_vec(-q * T(HALF_LOG2E));
        const bool keep = (q <= k2) & (x <= x1);  // no short-circuit: no branch
        row[j] += keep ? vg.dens * e : T(0);
      }
    }
  }
}

CRYOGS_CPU_CLONES void voxel_plane(int64_t N, int D, int Dp, float k2, int z, const VoxelBox<float>* boxes,
                                   float* buf) {
  voxel_plane_impl<float>(N, D, Dp, k2, z, boxes, buf);
}

void voxel_plane(int64_t N, int D, int Dp, double k2, int z, const VoxelBox<double>* boxes, double* buf) {
  voxel_plane_impl<double>(N, D, Dp, k2, z, boxes, buf);
}

template <typename T>
void voxelize(int64_t N, int D, T p, T cutoff,
              const T* means,       // [N, 3]
              const T* quats,       // [N, 4]
              const T* scales,      // [N, 3]
              const T* amplitudes,  // [N]
              T* volume) {          // [D, D, D] out, every voxel written once
  std::vector<VoxelBox<T>> boxes(static_cast<size_t>(N));
  const T c0 = static_cast<T>(D / 2);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N; ++g) {
    VoxelBox<T>& bx = boxes[g];
    bx.vg = voxel_setup(means + 3 * g, quats + 4 * g, scales + 3 * g, amplitudes[g], p, c0, cutoff);
    bool ok = bx.vg.ok;
    for (int k = 0; k < 3; ++k) ok = ok && axis_span(bx.vg.c[k], bx.vg.radii[k], D, bx.lo[k], bx.hi[k]);
    if (!ok) {
      bx.lo[0] = bx.lo[1] = bx.lo[2] = 0;
      bx.hi[0] = bx.hi[1] = bx.hi[2] = -1;
    }
  }
  const int Dp = D + W;
  const T k2 = cutoff * cutoff;
#pragma omp parallel
  {
    std::vector<T> buf(static_cast<size_t>(D) * Dp);
#pragma omp for schedule(dynamic, 1)
    for (int z = 0; z < D; ++z) {
      std::fill(buf.begin(), buf.end(), T(0));
      voxel_plane(N, D, Dp, k2, z, boxes.data(), buf.data());
      for (int y = 0; y < D; ++y) {
        std::copy_n(buf.data() + static_cast<int64_t>(y) * Dp, D, volume + (static_cast<int64_t>(z) * D + y) * D);
      }
    }
  }
}

}  // namespace

at::Tensor cpu_voxelize_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                            const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff) {
  const char* op = "cpu_voxelize_fwd";
  TORCH_CHECK(means.defined() && means.dim() == 2, "cryogs.", op, ": means must have shape [N, 3]");
  const at::ScalarType dt = means.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "cryogs.", op, ": means must be float32 or float64, got ", dt);
  check_geometry(op, box_size, pixel_size, cutoff);
  TORCH_CHECK(box_size <= 2048, "cryogs.", op, ": box_size must be <= 2048 for a volume, got ", box_size);
  const int64_t N = means.size(0), D = box_size;
  check_tensor(op, "means", means, {N, 3}, dt, false);
  check_tensor(op, "quats", quats, {N, 4}, dt, false);
  check_tensor(op, "scales", scales, {N, 3}, dt, false);
  check_tensor(op, "amplitudes", amplitudes, {N}, dt, false);
  TORCH_CHECK(N < (int64_t(1) << 31), "cryogs.", op, ": at most 2^31 - 1 Gaussians, got ", N);
  at::Tensor volume = alloc_out({D, D, D}, means.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "cryogs_cpu_voxelize_fwd", [&] {
    using T = scalar_t;
    voxelize<T>(N, static_cast<int>(D), static_cast<T>(pixel_size), static_cast<T>(cutoff), means.data_ptr<T>(),
                quats.data_ptr<T>(), scales.data_ptr<T>(), amplitudes.data_ptr<T>(), volume.data_ptr<T>());
  });
  return volume;
}

}  // namespace cryogs

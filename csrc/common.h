// Host-side helpers shared by the op wrappers: input validation, output allocation (with the debug
// NaN poisoning) and the op declarations bound in bindings.cpp.
#pragma once

// Light ATen headers only (torch/extension.h, which pulls in all of libtorch and pybind11, is
// included by bindings.cpp alone): this cuts the compile time of each host file several-fold.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace cryogs {

// Whether the ops' tensors live on a CUDA device. The emulated build (csrc/emu/, CRYOGS_EMULATED)
// runs the same kernels on CPU threads, so its "device" tensors are CPU tensors.
#ifdef CRYOGS_EMULATED
constexpr bool KERNELS_ON_GPU = false;
#else
constexpr bool KERNELS_ON_GPU = true;
#endif

// Debug poisoning: when on, every output buffer an op fully overwrites is first filled with NaN
// (float) or a sentinel (int), so an unwritten element shows in the tests. Initialised from the
// environment variable CRYOGS_DEBUG_POISON (any value but "", "0"), settable at run time.
bool debug_poison();
void set_debug_poison(bool on);

// Fills t with NaN (floating point) or INT_MIN-like sentinels (integers) if poisoning is on.
void maybe_poison(at::Tensor& t);

// at::empty(sizes, options), poisoned if poisoning is on.
at::Tensor alloc_out(at::IntArrayRef sizes, const at::TensorOptions& options);

// Checks that t is defined, on the ops' device (cuda) or the CPU, of dtype `dtype`, contiguous, and of shape
// `shape` (-1 = any size); messages name the op and the argument.
void check_tensor(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                  at::ScalarType dtype, bool cuda);

// Checks that all tensors are on the same device as `ref`.
void check_same_device(const char* op, const at::Tensor& ref, std::initializer_list<at::Tensor> others);

void check_geometry(const char* op, int64_t box_size, double pixel_size, double cutoff);

// Number of tiles along one side of a D x D image.
int64_t tiles_per_side(int64_t box_size);

// ---- CUDA ops (preprocess.cpp, bin.cpp, rasterize.cpp, voxelize.cpp; absent with CRYOGS_CPU_ONLY) ---
std::vector<at::Tensor> preprocess_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                       const at::Tensor& amplitudes, const at::Tensor& rotations,
                                       const at::Tensor& shifts, int64_t box_size, double pixel_size, double cutoff);

std::vector<at::Tensor> preprocess_bwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                       const at::Tensor& amplitudes, const at::Tensor& rotations,
                                       const at::Tensor& v_means2d, const at::Tensor& v_conics,
                                       const at::Tensor& v_weights, double pixel_size, bool pose_grads,
                                       bool gauss_grads);

// `instances` must be the sum of tile_counts (the caller has read it back already; see bin.cpp).
std::vector<at::Tensor> bin_instances(const at::Tensor& means2d, const at::Tensor& radii,
                                      const at::Tensor& tile_counts, int64_t box_size, int64_t instances);

at::Tensor rasterize_fwd(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                         const at::Tensor& tile_ranges, const at::Tensor& gids, int64_t box_size, double cutoff,
                         c10::optional<at::Tensor> out);

void rasterize_bwd(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                   const at::Tensor& radii, const at::Tensor& tile_ranges, const at::Tensor& gids,
                   const at::Tensor& v_image, int64_t box_size, double cutoff, at::Tensor v_means2d,
                   at::Tensor v_conics, at::Tensor v_weights);

at::Tensor voxelize_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                        const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff);

// ---- CPU twins (cpu_twins.cpp): the same header maths in plain host loops, float32 or float64 ----
std::vector<at::Tensor> preprocess_fwd_cpu(const at::Tensor& means, const at::Tensor& quats,
                                           const at::Tensor& scales, const at::Tensor& amplitudes,
                                           const at::Tensor& rotations, const at::Tensor& shifts, int64_t box_size,
                                           double pixel_size, double cutoff);

std::vector<at::Tensor> preprocess_bwd_cpu(const at::Tensor& means, const at::Tensor& quats,
                                           const at::Tensor& scales, const at::Tensor& amplitudes,
                                           const at::Tensor& rotations, const at::Tensor& v_means2d,
                                           const at::Tensor& v_conics, const at::Tensor& v_weights,
                                           double pixel_size, bool pose_grads);

// Without tile_counts: brute force over every pixel with the plain form w exp(-q/2), q <= k^2. With
// tile_counts: only over the covered tiles (the whole tile in the forward, the pair's box inside it
// in the backward) with the kernels' prescaled exp2 form, as the kernels do.
at::Tensor rasterize_fwd_cpu(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& weights,
                             const at::Tensor& radii, const c10::optional<at::Tensor>& tile_counts, int64_t box_size,
                             double cutoff);

std::vector<at::Tensor> rasterize_bwd_cpu(const at::Tensor& means2d, const at::Tensor& conics,
                                          const at::Tensor& weights, const at::Tensor& radii,
                                          const c10::optional<at::Tensor>& tile_counts, const at::Tensor& v_image,
                                          int64_t box_size, double cutoff);

at::Tensor voxelize_cpu(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                        const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff,
                        bool use_box);


// ---- CPU backend (project_cpu.cpp, voxelize_cpu.cpp): OpenMP, float32 or float64 CPU tensors ---
// Built into every configuration of the extension (with or without the CUDA ops).
// -> {images [B, D, D], means2d [B, N, 2], conics [B, N, 3], weights [B, N], rects [B, N, 4] int32
//     (inclusive pixel box x0, x1, y0, y1 of each pair; empty when x0 > x1)}
std::vector<at::Tensor> cpu_project_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const at::Tensor& amplitudes, const at::Tensor& rotations,
                                        const at::Tensor& shifts, int64_t box_size, double pixel_size,
                                        double cutoff);

// From the forward's per-pair outputs and dL/dI [B, D, D] -> {v_means, v_quats, v_scales,
// v_amplitudes (undefined without gauss_grads), v_rotations, v_shifts (undefined without pose_grads)}.
std::vector<at::Tensor> cpu_project_bwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const at::Tensor& amplitudes, const at::Tensor& rotations,
                                        const at::Tensor& means2d, const at::Tensor& conics,
                                        const at::Tensor& weights, const at::Tensor& rects,
                                        const at::Tensor& v_images, int64_t box_size, double pixel_size,
                                        double cutoff, bool pose_grads, bool gauss_grads);

// -> volume [D, D, D] (forward only)
at::Tensor cpu_voxelize_fwd(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                            const at::Tensor& amplitudes, int64_t box_size, double pixel_size, double cutoff);

// Backprojection gridding: adds values [n, C] of samples at k [n, 3] (x, y, z in grid units, x >= 0)
// trilinearly into sums [Dp * Dp * (Dp/2 + 1), C] (the padded half grid, z, y, x); all float64.
void cpu_grid_trilinear(const at::Tensor& sums, const at::Tensor& k, const at::Tensor& values, int64_t Dp);

// Whether the CPU ops were compiled with OpenMP, and its thread count now.
bool cpu_has_openmp();
int64_t cpu_num_threads();

}  // namespace cryogs

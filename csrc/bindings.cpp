// Python bindings of the cryogs.render._C extension. Ops take and return torch tensors; see common.h and
// kernels.h for shapes. Undefined tensors come back as None.
//
// Two configurations: with the CUDA ops (nvcc build, or the emulated one of tests/emu_build.py) and,
// with CRYOGS_CPU_ONLY (no nvcc, a CPU-only torch, or CRYOGS_BUILD_CUDA=0), the CPU ops alone: the
// CPU backend and the CPU twins. HAS_CUDA_OPS / HAS_CPU_OPS say which.
#include <torch/extension.h>

#include "common.h"
#include "gaussian_math.cuh"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CRYOGS_CPU_ONLY
  m.doc() = "cryogs rasterizer, CPU ops only: the cpu backend (OpenMP) and the CPU twins";
  m.attr("HAS_CUDA_OPS") = false;
#else
  m.doc() = "cryogs rasterizer: CUDA preprocess, binning, rasterize forward/backward, voxelize; the cpu backend; "
            "CPU twins";
  m.attr("HAS_CUDA_OPS") = true;
#endif
  m.attr("HAS_CPU_OPS") = true;
  m.attr("DEVICE_TYPE") = cryogs::KERNELS_ON_GPU ? "cuda" : "cpu";  // of the CUDA ops' tensors
  m.attr("TILE_SIZE") = cryogs::TILE_SIZE;
  m.attr("RECT_PAD_REL") = cryogs::RECT_PAD_REL;
  m.attr("RECT_PAD_ABS") = cryogs::RECT_PAD_ABS;

  m.def("debug_poison", &cryogs::debug_poison, "Whether outputs are NaN-poisoned before each kernel run");
  m.def("set_debug_poison", &cryogs::set_debug_poison, py::arg("on"),
        "Fill every fully-overwritten output with NaN (float) or a sentinel (int) before each run");

#ifndef CRYOGS_CPU_ONLY
  // CUDA ops.
  m.def("preprocess_fwd", &cryogs::preprocess_fwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("shifts"), py::arg("box_size"), py::arg("pixel_size"),
        py::arg("cutoff"),
        "-> [means2d [B,N,2], conics [B,N,3], weights [B,N], radii [B,N,2], tile_counts [B,N] int32]");
  m.def("preprocess_bwd", &cryogs::preprocess_bwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("v_means2d"), py::arg("v_conics"), py::arg("v_weights"),
        py::arg("pixel_size"), py::arg("pose_grads"), py::arg("gauss_grads"),
        "-> [v_means, v_quats, v_scales, v_amplitudes (None without gauss_grads), v_rotations, v_shifts "
        "(None without pose_grads)]");
  m.def("bin_instances", &cryogs::bin_instances, py::arg("means2d"), py::arg("radii"), py::arg("tile_counts"),
        py::arg("box_size"), py::arg("instances"),
        "-> [tile_ranges [B,T,2] int64, sorted keys [M] int32 (uint32 bits of b*T + tile), gids [M] int32]");
  m.def("rasterize_fwd", &cryogs::rasterize_fwd, py::arg("means2d"), py::arg("conics"), py::arg("weights"),
        py::arg("tile_ranges"), py::arg("gids"), py::arg("box_size"), py::arg("cutoff"), py::arg("out") = py::none(),
        "-> images [B,D,D] (written into out when given)");
  m.def("rasterize_bwd", &cryogs::rasterize_bwd, py::arg("means2d"), py::arg("conics"), py::arg("weights"),
        py::arg("radii"), py::arg("tile_ranges"), py::arg("gids"), py::arg("v_image"), py::arg("box_size"),
        py::arg("cutoff"), py::arg("v_means2d"), py::arg("v_conics"), py::arg("v_weights"),
        "Adds the 2D gradients into v_means2d [B,N,2], v_conics [B,N,3], v_weights [B,N]");
  m.def("voxelize_fwd", &cryogs::voxelize_fwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("box_size"), py::arg("pixel_size"), py::arg("cutoff"), "-> volume [D,D,D]");
#endif

  // CPU backend (float32 or float64 CPU tensors; OpenMP over images, row slabs and pairs).
  m.def("cpu_project_fwd", &cryogs::cpu_project_fwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("shifts"), py::arg("box_size"), py::arg("pixel_size"),
        py::arg("cutoff"),
        "-> [images [B,D,D], means2d [B,N,2], conics [B,N,3], weights [B,N], rects [B,N,4] int32 (x0,x1,y0,y1)]");
  m.def("cpu_project_bwd", &cryogs::cpu_project_bwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("means2d"), py::arg("conics"), py::arg("weights"),
        py::arg("rects"), py::arg("v_images"), py::arg("box_size"), py::arg("pixel_size"), py::arg("cutoff"),
        py::arg("pose_grads"), py::arg("gauss_grads"),
        "-> [v_means, v_quats, v_scales, v_amplitudes (None without gauss_grads), v_rotations, v_shifts "
        "(None without pose_grads)]");
  m.def("cpu_voxelize_fwd", &cryogs::cpu_voxelize_fwd, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("box_size"), py::arg("pixel_size"), py::arg("cutoff"), "-> volume [D,D,D]");
  m.def("cpu_grid_trilinear", &cryogs::cpu_grid_trilinear, py::arg("sums"), py::arg("k"), py::arg("values"),
        py::arg("Dp"), "Adds values [n, C] at k [n, 3] trilinearly into sums [Dp*Dp*(Dp/2+1), C] (float64, in place)");
  m.def("cpu_has_openmp", &cryogs::cpu_has_openmp, "Whether the CPU ops were compiled with OpenMP");
  m.def("cpu_num_threads", &cryogs::cpu_num_threads, "Threads the CPU ops use now (OpenMP's maximum)");

  // CPU twins (float32 or float64 CPU tensors).
  m.def("preprocess_fwd_cpu", &cryogs::preprocess_fwd_cpu, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("shifts"), py::arg("box_size"), py::arg("pixel_size"),
        py::arg("cutoff"));
  m.def("preprocess_bwd_cpu", &cryogs::preprocess_bwd_cpu, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("rotations"), py::arg("v_means2d"), py::arg("v_conics"),
        py::arg("v_weights"), py::arg("pixel_size"), py::arg("pose_grads"));
  m.def("rasterize_fwd_cpu", &cryogs::rasterize_fwd_cpu, py::arg("means2d"), py::arg("conics"), py::arg("weights"),
        py::arg("radii"), py::arg("tile_counts"), py::arg("box_size"), py::arg("cutoff"));
  m.def("rasterize_bwd_cpu", &cryogs::rasterize_bwd_cpu, py::arg("means2d"), py::arg("conics"), py::arg("weights"),
        py::arg("radii"), py::arg("tile_counts"), py::arg("v_image"), py::arg("box_size"), py::arg("cutoff"));
  m.def("voxelize_cpu", &cryogs::voxelize_cpu, py::arg("means"), py::arg("quats"), py::arg("scales"),
        py::arg("amplitudes"), py::arg("box_size"), py::arg("pixel_size"), py::arg("cutoff"), py::arg("use_box"));
}

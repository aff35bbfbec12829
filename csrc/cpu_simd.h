// Host-only helpers of the CPU backend (project_cpu.cpp, voxelize_cpu.cpp): a branch-free exp2 that
// the compiler can vectorise, the ISA dispatch of the hot loops, and OpenMP shims.
//
// The per-Gaussian maths itself is gaussian_math.cuh's; only the per-pixel exponential is replaced:
// libm's exp2f is a function call that no loop vectorises (without -ffast-math and libmvec), so the
// float32 inner loops use exp2_vec below (within ~2 ulp of exp2f on the range used, see its comment).
// float64 keeps libm's exp2 (gm_exp2): it serves the exact tests, not speed.
#pragma once

#include <stdint.h>

#include <bit>

#include "gaussian_math.cuh"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cryogs {

// Clones of the hot loops for AVX2+FMA machines and the x86-64 baseline, picked at load time (an
// extension built on one x86 machine runs on any other). Not in the emulated build (sanitizers and
// ifunc resolvers do not mix) nor off x86-64/GCC, where the loops are compiled once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CRYOGS_EMULATED)
#define CRYOGS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CRYOGS_CPU_CLONES
#endif

inline int cpu_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// 2^x for float, branch-free: x = k + f with k = round(x) (the 1.5 * 2^23 trick, exact for |x| < 2^22)
// and f in [-1/2, 1/2]; 2^f by its Taylor series in f ln 2 to degree 7 (truncation < 5.3e-9
// relative), times 2^k built in the exponent bits. x is clamped to [-126, 126] first, so k + 127 is a
// normal exponent; NaN becomes -126 (a NaN q fails every `q <= k2` test anyway, so only the
// absence of undefined float->int conversions matters). Relative error within ~2 ulp for x in
// [-126, 126]; the callers only keep x in [-k^2/2 log2(e), 0] (x >= -9 at a 3.5 sigma cutoff).
inline float exp2_vec(float x) {
  x = x >= -126.f ? x : -126.f;
  x = x <= 126.f ? x : 126.f;
  const float kf = (x + 12582912.f) - 12582912.f;
  const float f = x - kf;
  float p = 1.5252733804059841e-05f;  // (ln 2)^7 / 7!
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428441e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;  // ln 2
  p = p * f + 1.f;
  const int32_t k = static_cast<int32_t>(kf);
  return p * std::bit_cast<float>(static_cast<uint32_t>(k + 127) << 23);
}

inline double exp2_vec(double x) { return gm_exp2(x); }

// eval_scaled (gaussian_math.cuh) with exp2_vec, and with the pixel also inside [.., x_hi]: the
// loops run over whole vectors of pixels, whose tail past the pair's box must not count.
template <typename T>
inline T eval_scaled_vec(const ScaledConic<T>& s, T dx, T dy, T k2s, bool in_box) {
  const T qs = scaled_q(s, dx, dy);
  const T e = exp2_vec(-qs);
  const bool keep = (qs <= k2s) & in_box;  // no short-circuit: no branch in the vector loop
  return keep ? e : T(0);
}

}  // namespace cryogs

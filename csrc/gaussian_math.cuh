// Per-Gaussian maths of cryogs, shared by the CUDA kernels and their CPU twins.
//
// Every function is `__host__ __device__` (under nvcc) and templated on the scalar type, so the CPU
// twins in cpu_twins.cpp run the very same code in float64 and the tests can check it against
// torch.autograd. Each forward sits next to its gradient (vector-Jacobian product, `v_` = dL/dx).
//
// Conventions (identical to cryogs/render/gaussian_math.py; see cryogs/physics/conventions.py for the geometry):
//   u    = (A_b mu)_xy / p + D//2 - t_b / p                       2D centre in pixels (x, y)
//   L    = R(q) diag(s)                                           3x3, row-major
//   M    = A_b[:2] L / p                                          2x3, rows r0, r1 (pixels)
//   Sigma2D = M M^T = [[sxx, sxy], [sxy, syy]]
//   det  = m01^2 + m02^2 + m12^2, the squared 2x2 minors of M (Cauchy-Binet; never negative)
//   conic (a, b, c) = (syy, -sxy, sxx) / det, with q(dx, dy) = a dx^2 + 2 b dx dy + c dy^2
//   w    = m / (2 pi sqrt(det))                                   peak value (mass per pixel)
//   radii = (k sqrt(sxx), k sqrt(syy))                            half-extents of the cutoff box
//   I_b(x) = sum_g w exp(-q/2) over pairs with q <= k^2 (k = cutoff in standard deviations)
// A pair is valid iff det > 0 and w, conic, u and radii are all finite; an invalid pair gets
// u = conic = w = radii = 0 and covers no tiles.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define GM_HD __host__ __device__ __forceinline__
#define GM_UNROLL _Pragma("unroll")
#else
#define GM_HD inline
#define GM_UNROLL
#endif

namespace cryogs {

// Tile side in pixels used by the binning and the rasterizer (blocks have TILE_SIZE^2 threads).
constexpr int TILE_SIZE = 16;

// Relative and absolute padding of the cutoff box (see axis_span) so that float rounding in q can
// never put a pixel with q <= k^2 outside the box (covers ~1e-3 relative error in the extent, i.e.
// float32 covariances with a condition number up to ~1e4).
constexpr double RECT_PAD_REL = 0.0009765625;  // 2^-10
constexpr double RECT_PAD_ABS = 0.0009765625;  // 2^-10 px

// 0.5 * log2(e): exp(-q/2) == exp2(-q * HALF_LOG2E).
constexpr double HALF_LOG2E = 0.72134752044448170368;
constexpr double TWO_PI = 6.28318530717958647693;
constexpr double TWO_PI_POW_1_5 = 15.74960994572241974;  // (2 pi)^1.5

// ---------------------------------------------------------------------------------------------
// Scalar helpers: one overload per type so host and device pick the right libm function.
// ---------------------------------------------------------------------------------------------
GM_HD float gm_sqrt(float x) { return sqrtf(x); }
GM_HD double gm_sqrt(double x) { return sqrt(x); }
GM_HD float gm_exp(float x) { return expf(x); }
GM_HD double gm_exp(double x) { return exp(x); }
GM_HD float gm_exp2(float x) { return exp2f(x); }
GM_HD double gm_exp2(double x) { return exp2(x); }
GM_HD float gm_abs(float x) { return fabsf(x); }
GM_HD double gm_abs(double x) { return fabs(x); }
GM_HD float gm_ceil(float x) { return ceilf(x); }
GM_HD double gm_ceil(double x) { return ceil(x); }
GM_HD float gm_floor(float x) { return floorf(x); }
GM_HD double gm_floor(double x) { return floor(x); }
GM_HD float gm_max(float a, float b) { return fmaxf(a, b); }
GM_HD double gm_max(double a, double b) { return fmax(a, b); }
GM_HD float gm_min(float a, float b) { return fminf(a, b); }
GM_HD double gm_min(double a, double b) { return fmin(a, b); }
GM_HD float gm_max_finite(float) { return FLT_MAX; }
GM_HD double gm_max_finite(double) { return DBL_MAX; }

// True for finite x (false for +-inf and NaN); safe without fast-math.
template <typename T>
GM_HD bool is_finite(T x) {
  return gm_abs(x) <= gm_max_finite(x);
}

// Correctly rounded add/sub/mul that the compiler may not fuse into an FMA: the tile rectangle must
// come out bit-identical at every call site and in the PyTorch reference (cryogs/render/binning.py). On the
// host, a product and the operands of a sum go through a volatile, which no contraction
// (-ffp-contract=fast, as in the emulated build) can fuse across.
#if defined(__CUDA_ARCH__)
GM_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
GM_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
GM_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
GM_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
GM_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
GM_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
GM_HD T rounded(T x) {
  const volatile T r = x;
  return r;
}
GM_HD float add_rn(float a, float b) { return rounded(a) + rounded(b); }
GM_HD double add_rn(double a, double b) { return rounded(a) + rounded(b); }
GM_HD float sub_rn(float a, float b) { return rounded(a) - rounded(b); }
GM_HD double sub_rn(double a, double b) { return rounded(a) - rounded(b); }
GM_HD float mul_rn(float a, float b) { return rounded(a * b); }
GM_HD double mul_rn(double a, double b) { return rounded(a * b); }
#endif

// ---------------------------------------------------------------------------------------------
// Quaternion -> rotation matrix, and its VJP (normalisation included).
// q = (w, x, y, z), scalar first; R is row-major 3x3.
// ---------------------------------------------------------------------------------------------
template <typename T>
GM_HD void quat_to_rotmat(const T q[4], T R[9]) {
  const T n = gm_sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
  const T w = q[0] / n, x = q[1] / n, y = q[2] / n, z = q[3] / n;
  R[0] = T(1) - T(2) * (y * y + z * z);
  R[1] = T(2) * (x * y - w * z);
  R[2] = T(2) * (x * z + w * y);
  R[3] = T(2) * (x * y + w * z);
  R[4] = T(1) - T(2) * (x * x + z * z);
  R[5] = T(2) * (y * z - w * x);
  R[6] = T(2) * (x * z - w * y);
  R[7] = T(2) * (y * z + w * x);
  R[8] = T(1) - T(2) * (x * x + y * y);
}

// v_q = (dR/dq)^T v_R, through the normalisation qn = q / |q|.
template <typename T>
GM_HD void quat_to_rotmat_vjp(const T q[4], const T V[9], T v_q[4]) {
  const T n = gm_sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
  const T w = q[0] / n, x = q[1] / n, y = q[2] / n, z = q[3] / n;
  // Gradient with respect to the normalised quaternion (each R entry differentiated by hand).
  const T gw = T(2) * (-z * V[1] + y * V[2] + z * V[3] - x * V[5] - y * V[6] + x * V[7]);
  const T gx = T(2) * (y * V[1] + z * V[2] + y * V[3] - T(2) * x * V[4] - w * V[5] + z * V[6] + w * V[7] -
                       T(2) * x * V[8]);
  const T gy = T(2) * (-T(2) * y * V[0] + x * V[1] + w * V[2] + x * V[3] + z * V[5] - w * V[6] + z * V[7] -
                       T(2) * y * V[8]);
  const T gz = T(2) * (-T(2) * z * V[0] - w * V[1] + x * V[2] + w * V[3] - T(2) * z * V[4] + y * V[5] +
                       x * V[6] + y * V[7]);
  // d(q/|q|)/dq = (I - qn qn^T) / |q|.
  const T dot = w * gw + x * gx + y * gy + z * gz;
  v_q[0] = (gw - w * dot) / n;
  v_q[1] = (gx - x * dot) / n;
  v_q[2] = (gy - y * dot) / n;
  v_q[3] = (gz - z * dot) / n;
}

// L = R diag(s): L[k][j] = R[k][j] s[j]. Its VJP is applied per Gaussian after summing v_L over
// images (see scale_rot_vjp).
template <typename T>
GM_HD void scale_rot(const T R[9], const T s[3], T L[9]) {
GM_UNROLL
  for (int k = 0; k < 3; ++k) {
GM_UNROLL
    for (int j = 0; j < 3; ++j) L[3 * k + j] = R[3 * k + j] * s[j];
  }
}

// Gaussian g read from the [N, 3] means, [N, 4] quats and [N, 3] scales, with R = R(q) and the
// covariance factor L = R diag(s). Kernels and CPU twins all read Gaussians through this.
template <typename T>
struct Gaussian {
  T mu[3], q[4], s[3], R[9], L[9];
};

template <typename T>
GM_HD Gaussian<T> load_gaussian(int64_t g, const T* means, const T* quats, const T* scales) {
  Gaussian<T> G;
GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    G.mu[k] = means[3 * g + k];
    G.s[k] = scales[3 * g + k];
  }
GM_UNROLL
  for (int k = 0; k < 4; ++k) G.q[k] = quats[4 * g + k];
  quat_to_rotmat(G.q, G.R);
  scale_rot(G.R, G.s, G.L);
  return G;
}

// From v_L: v_s[j] = sum_k v_L[k][j] R[k][j];  v_R[k][j] = v_L[k][j] s[j].
template <typename T>
GM_HD void scale_rot_vjp(const T R[9], const T s[3], const T v_L[9], T v_R[9], T v_s[3]) {
GM_UNROLL
  for (int j = 0; j < 3; ++j) {
    v_s[j] = v_L[j] * R[j] + v_L[3 + j] * R[3 + j] + v_L[6 + j] * R[6 + j];
GM_UNROLL
    for (int k = 0; k < 3; ++k) v_R[3 * k + j] = v_L[3 * k + j] * s[j];
  }
}

// VJP of load_gaussian's L = R(q) diag(s): v_q and v_s from the v_L summed over the Gaussian's
// pairs. A Gaussian without gradient (every v_L zero: e.g. a zero or non-finite quaternion, whose
// NaN R makes every pair invalid) gets zeros, not 0 * NaN.
template <typename T>
GM_HD void load_gaussian_vjp(const Gaussian<T>& G, const T v_L[9], T v_q[4], T v_s[3]) {
  bool any = false;
GM_UNROLL
  for (int k = 0; k < 9; ++k) any = any || v_L[k] != T(0);
  if (!any) {
    v_q[0] = v_q[1] = v_q[2] = v_q[3] = T(0);
    v_s[0] = v_s[1] = v_s[2] = T(0);
    return;
  }
  T v_R[9];
  scale_rot_vjp(G.R, G.s, v_L, v_R, v_s);
  quat_to_rotmat_vjp(G.q, v_R, v_q);
}

// ---------------------------------------------------------------------------------------------
// 2D centre u = (A mu)_xy / p + c0 - t / p, and its VJP.
// A is the row-major 3x3 RELION matrix (only rows 0 and 1 are used), t the origin in Angstrom.
// ---------------------------------------------------------------------------------------------
template <typename T>
GM_HD void mean2d(const T A[9], const T mu[3], const T t[2], T p, T c0, T u[2]) {
GM_UNROLL
  for (int i = 0; i < 2; ++i) {
    const T r = A[3 * i] * mu[0] + A[3 * i + 1] * mu[1] + A[3 * i + 2] * mu[2];
    u[i] = r / p + c0 - t[i] / p;
  }
}

// Accumulates v_mu += A2^T v_u / p, v_A[i][k] += v_u[i] mu[k] / p, v_t[i] += -v_u[i] / p.
// Any of the outputs may be null.
template <typename T>
GM_HD void mean2d_vjp(const T A[9], const T mu[3], T p, const T v_u[2], T* v_mu, T* v_A, T* v_t) {
  const T gx = v_u[0] / p, gy = v_u[1] / p;
  if (v_mu) {
GM_UNROLL
    for (int k = 0; k < 3; ++k) v_mu[k] += A[k] * gx + A[3 + k] * gy;
  }
  if (v_A) {
GM_UNROLL
    for (int k = 0; k < 3; ++k) {
      v_A[k] += gx * mu[k];
      v_A[3 + k] += gy * mu[k];
    }
  }
  if (v_t) {
    v_t[0] -= gx;
    v_t[1] -= gy;
  }
}

// ---------------------------------------------------------------------------------------------
// Projected factor M = A2 L / p (2x3, row-major: M[0..2] = r0, M[3..5] = r1), and its VJP.
// ---------------------------------------------------------------------------------------------
template <typename T>
GM_HD void projected_factor(const T A[9], const T L[9], T p, T M[6]) {
GM_UNROLL
  for (int i = 0; i < 2; ++i) {
GM_UNROLL
    for (int j = 0; j < 3; ++j) {
      M[3 * i + j] = (A[3 * i] * L[j] + A[3 * i + 1] * L[3 + j] + A[3 * i + 2] * L[6 + j]) / p;
    }
  }
}

// Accumulates v_L[k][j] += sum_i A[i][k] v_M[i][j] / p and v_A[i][k] += sum_j v_M[i][j] L[k][j] / p
// (v_A covers rows 0 and 1 only, 6 entries). Either output may be null.
template <typename T>
GM_HD void projected_factor_vjp(const T A[9], const T L[9], T p, const T v_M[6], T* v_L, T* v_A) {
  if (v_L) {
GM_UNROLL
    for (int k = 0; k < 3; ++k) {
GM_UNROLL
      for (int j = 0; j < 3; ++j) v_L[3 * k + j] += (A[k] * v_M[j] + A[3 + k] * v_M[3 + j]) / p;
    }
  }
  if (v_A) {
GM_UNROLL
    for (int i = 0; i < 2; ++i) {
GM_UNROLL
      for (int k = 0; k < 3; ++k) {
        v_A[3 * i + k] +=
            (v_M[3 * i] * L[3 * k] + v_M[3 * i + 1] * L[3 * k + 1] + v_M[3 * i + 2] * L[3 * k + 2]) / p;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sigma2D = M M^T, det by Cauchy-Binet, conic and weight; and the VJP back to M and m.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Cov2D {
  T sxx, sxy, syy;  // Sigma2D entries (px^2)
  T m01, m02, m12;  // 2x2 minors of M (columns 01, 02, 12)
  T det;            // m01^2 + m02^2 + m12^2 == sxx syy - sxy^2
};

template <typename T>
GM_HD Cov2D<T> cov2d(const T M[6]) {
  Cov2D<T> c;
  c.sxx = M[0] * M[0] + M[1] * M[1] + M[2] * M[2];
  c.sxy = M[0] * M[3] + M[1] * M[4] + M[2] * M[5];
  c.syy = M[3] * M[3] + M[4] * M[4] + M[5] * M[5];
  c.m01 = M[0] * M[4] - M[1] * M[3];
  c.m02 = M[0] * M[5] - M[2] * M[3];
  c.m12 = M[1] * M[5] - M[2] * M[4];
  c.det = c.m01 * c.m01 + c.m02 * c.m02 + c.m12 * c.m12;
  return c;
}

// Adds v_det * d(det)/dM to v_M, differentiating the minor sum (no cancellation).
template <typename T>
GM_HD void det_vjp(const T M[6], const Cov2D<T>& c, T v_det, T v_M[6]) {
  const T g = T(2) * v_det;
  v_M[0] += g * (c.m01 * M[4] + c.m02 * M[5]);
  v_M[1] += g * (-c.m01 * M[3] + c.m12 * M[5]);
  v_M[2] += g * (-c.m02 * M[3] - c.m12 * M[4]);
  v_M[3] += g * (-c.m01 * M[1] - c.m02 * M[2]);
  v_M[4] += g * (c.m01 * M[0] - c.m12 * M[2]);
  v_M[5] += g * (c.m02 * M[0] + c.m12 * M[1]);
}

// conic = (syy, -sxy, sxx) / det; w = m / (2 pi sqrt(det)).
template <typename T>
GM_HD void conic_and_weight(const Cov2D<T>& c, T m, T conic[3], T& w) {
  conic[0] = c.syy / c.det;
  conic[1] = -c.sxy / c.det;
  conic[2] = c.sxx / c.det;
  w = m / (T(TWO_PI) * gm_sqrt(c.det));
}

// VJP of (conic, w) with respect to M (written to v_M, overwritten) and m (returned in v_m), for the
// STORED conic entries (a, b, c): v_conic[1] is dL/db of the off-diagonal b as stored, which enters
// q as 2 b dx dy. Derived directly from conic = (syy, -sxy, sxx)/det, so no symmetric-matrix factor
// 1/2 is involved here.
template <typename T>
GM_HD void conic_and_weight_vjp(const T M[6], const Cov2D<T>& c, const T conic[3], T w, const T v_conic[3],
                                T v_w, T v_M[6], T& v_m) {
  const T inv_det = T(1) / c.det;
  const T v_syy = v_conic[0] * inv_det;
  const T v_sxy = -v_conic[1] * inv_det;
  const T v_sxx = v_conic[2] * inv_det;
  // d(conic_i)/d(det) = -conic_i / det;  dw/d(det) = -w / (2 det).
  const T v_det = -(v_conic[0] * conic[0] + v_conic[1] * conic[1] + v_conic[2] * conic[2]) * inv_det -
                  T(0.5) * v_w * w * inv_det;
  v_m = v_w / (T(TWO_PI) * gm_sqrt(c.det));
  // sxx = r0.r0, sxy = r0.r1, syy = r1.r1.
GM_UNROLL
  for (int j = 0; j < 3; ++j) {
    v_M[j] = T(2) * v_sxx * M[j] + v_sxy * M[3 + j];
    v_M[3 + j] = T(2) * v_syy * M[3 + j] + v_sxy * M[j];
  }
  det_vjp(M, c, v_det, v_M);
}

// ---------------------------------------------------------------------------------------------
// One (image, Gaussian) pair, forward. L = R(q) diag(s) is precomputed per Gaussian.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct PairFwd {
  T u[2];      // centre (px)
  T conic[3];  // (a, b, c)
  T w;         // peak value
  T radii[2];  // k sqrt(sxx), k sqrt(syy)
  bool ok;     // valid pair (otherwise everything above is 0)
};

template <typename T>
GM_HD PairFwd<T> pair_forward(const T A[9], const T t[2], const T mu[3], const T L[9], T m, T p, T c0, T cutoff) {
  PairFwd<T> out;
  T M[6];
  mean2d(A, mu, t, p, c0, out.u);
  projected_factor(A, L, p, M);
  const Cov2D<T> c = cov2d(M);
  conic_and_weight(c, m, out.conic, out.w);
  out.radii[0] = cutoff * gm_sqrt(gm_max(c.sxx, T(0)));
  out.radii[1] = cutoff * gm_sqrt(gm_max(c.syy, T(0)));
  out.ok = c.det > T(0) && is_finite(out.w) && is_finite(out.conic[0]) && is_finite(out.conic[1]) &&
           is_finite(out.conic[2]) && is_finite(out.u[0]) && is_finite(out.u[1]) && is_finite(out.radii[0]) &&
           is_finite(out.radii[1]);
  if (!out.ok) {
    out.u[0] = out.u[1] = T(0);
    out.conic[0] = out.conic[1] = out.conic[2] = T(0);
    out.w = T(0);
    out.radii[0] = out.radii[1] = T(0);
  }
  return out;
}

// One pair, backward from (v_conic, v_w) to v_M and v_m. Returns false (outputs untouched) for an
// invalid pair, whose gradients are zero by definition. The v_u part is handled by mean2d_vjp,
// which needs nothing recomputed.
template <typename T>
GM_HD bool pair_backward_cov(const T A[9], const T L[9], T m, T p, const T v_conic[3], T v_w, T v_M[6], T& v_m) {
  T M[6];
  projected_factor(A, L, p, M);
  const Cov2D<T> c = cov2d(M);
  T conic[3], w;
  conic_and_weight(c, m, conic, w);
  const bool ok = c.det > T(0) && is_finite(w) && is_finite(conic[0]) && is_finite(conic[1]) && is_finite(conic[2]);
  if (!ok) return false;
  conic_and_weight_vjp(M, c, conic, w, v_conic, v_w, v_M, v_m);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Cutoff box and tile rectangle. The SAME functions are used by the count (preprocess), duplicate,
// and rasterize-backward passes and mirrored exactly by cryogs/render/binning.py:
//   rho = r * (1 + 2^-10) + 2^-10                 (each op correctly rounded, no FMA)
//   lo  = max(ceil(u - rho), 0),  hi = min(floor(u + rho), D - 1)
//   empty if lo > hi or either is NaN; otherwise pixels lo..hi (inclusive) on that axis.
// Tiles: tile t covers pixels [t*TS, (t+1)*TS - 1], so tiles lo/TS .. hi/TS.
// Every pixel with q <= k^2 has |dx| <= k sqrt(sxx) (up to rounding, absorbed by the pad), so the
// box covers the whole truncated footprint.
// ---------------------------------------------------------------------------------------------
template <typename T>
GM_HD bool axis_span(T u, T r, int D, int& lo, int& hi) {
  const T rho = add_rn(mul_rn(r, T(1.0 + RECT_PAD_REL)), T(RECT_PAD_ABS));
  const T flo_raw = gm_ceil(sub_rn(u, rho));
  const T fhi_raw = gm_floor(add_rn(u, rho));
  lo = 0;
  hi = -1;
  if (flo_raw != flo_raw || fhi_raw != fhi_raw) return false;  // NaN
  const T flo = gm_max(flo_raw, T(0));
  const T fhi = gm_min(fhi_raw, T(D - 1));
  if (!(flo <= fhi)) return false;
  lo = static_cast<int>(flo);
  hi = static_cast<int>(fhi);
  return true;
}

struct Rect {
  int x0, x1, y0, y1;  // inclusive bounds (pixels or tiles)
};

// Pixel box of a pair inside the image; false if it is empty.
template <typename T>
GM_HD bool pixel_rect(T ux, T uy, T rx, T ry, int D, Rect& r) {
  const bool okx = axis_span(ux, rx, D, r.x0, r.x1);
  const bool oky = axis_span(uy, ry, D, r.y0, r.y1);
  return okx && oky;
}

// Tile rectangle of a pair; false if it covers no tile. Pixel box returned too.
template <typename T>
GM_HD bool tile_rect(T ux, T uy, T rx, T ry, int D, int tile_size, Rect& pix, Rect& tiles) {
  if (!pixel_rect(ux, uy, rx, ry, D, pix)) {
    tiles.x0 = tiles.y0 = 0;
    tiles.x1 = tiles.y1 = -1;
    return false;
  }
  tiles.x0 = pix.x0 / tile_size;
  tiles.x1 = pix.x1 / tile_size;
  tiles.y0 = pix.y0 / tile_size;
  tiles.y1 = pix.y1 / tile_size;
  return true;
}

// Number of tiles a pair covers (0 when invalid or outside the image).
template <typename T>
GM_HD int32_t tile_count(bool ok, T ux, T uy, T rx, T ry, int D, int tile_size) {
  if (!ok) return 0;
  Rect pix, tiles;
  if (!tile_rect(ux, uy, rx, ry, D, tile_size, pix, tiles)) return 0;
  return (tiles.x1 - tiles.x0 + 1) * (tiles.y1 - tiles.y0 + 1);
}

// ---------------------------------------------------------------------------------------------
// Per-pixel evaluation and gradient.
// ---------------------------------------------------------------------------------------------
// q = a dx^2 + 2 b dx dy + c dy^2.
template <typename T>
GM_HD T conic_q(const T conic[3], T dx, T dy) {
  return conic[0] * dx * dx + T(2) * conic[1] * dx * dy + conic[2] * dy * dy;
}

// Plain evaluation: w exp(-q/2) if q <= k^2, else 0.
template <typename T>
GM_HD T eval_pixel(const T conic[3], T w, T dx, T dy, T k2) {
  const T q = conic_q(conic, dx, dy);
  return q <= k2 ? w * gm_exp(T(-0.5) * q) : T(0);
}

// Prescaled form used by the kernels: q' = q * HALF_LOG2E, value = w exp2(-q').
// pa = a h, pb = 2 b h, pc = c h with h = HALF_LOG2E; k2s = k^2 h.
template <typename T>
struct ScaledConic {
  T pa, pb, pc;
};

template <typename T>
GM_HD ScaledConic<T> scale_conic(const T conic[3]) {
  ScaledConic<T> s;
  s.pa = conic[0] * T(HALF_LOG2E);
  s.pb = conic[1] * T(2.0 * HALF_LOG2E);
  s.pc = conic[2] * T(HALF_LOG2E);
  return s;
}

template <typename T>
GM_HD T scaled_cutoff(T cutoff) {
  return cutoff * cutoff * T(HALF_LOG2E);
}

// q' = dx (pa dx + pb dy) + pc dy^2.
template <typename T>
GM_HD T scaled_q(const ScaledConic<T>& s, T dx, T dy) {
  return dx * (s.pa * dx + s.pb * dy) + s.pc * dy * dy;
}

// exp(-q/2) = exp2(-q') if q' <= k2s, else 0. A NaN q' fails the test and gives 0.
template <typename T>
GM_HD T eval_scaled(const ScaledConic<T>& s, T dx, T dy, T k2s) {
  const T qs = scaled_q(s, dx, dy);
  const T e = gm_exp2(-qs);
  return qs <= k2s ? e : T(0);
}

// Per-pair sums over its pixels, with G = dL/dI at the pixel and e = exp(-q/2) (0 beyond the
// cutoff): S0 = sum G e, Sx = sum G e dx, Sy = sum G e dy, Sxx = sum G e dx^2, Sxy = sum G e dx dy,
// Syy = sum G e dy^2. Six registers per thread, finalised once.
template <typename T>
struct PixelMoments {
  T s0, sx, sy, sxx, sxy, syy;
  GM_HD void zero() { s0 = sx = sy = sxx = sxy = syy = T(0); }
  GM_HD void add(T ge, T dx, T dy) {
    const T gx = ge * dx, gy = ge * dy;
    s0 += ge;
    sx += gx;
    sy += gy;
    sxx += gx * dx;
    sxy += gx * dy;
    syy += gy * dy;
  }
};

// From the moments to the pair's 2D gradients, with value = w e and q = a dx^2 + 2b dx dy + c dy^2:
//   dvalue/dw  = e                      -> v_w  = S0
//   dvalue/du  = w e C d                -> v_ux = w (a Sx + b Sy),  v_uy = w (b Sx + c Sy)
//   dvalue/da  = -1/2 w e dx^2          -> v_a  = -1/2 w Sxx
//   dvalue/db  = -w e dx dy  (stored b) -> v_b  = -w Sxy
//   dvalue/dc  = -1/2 w e dy^2          -> v_c  = -1/2 w Syy
template <typename T>
GM_HD void finalize_moments(const PixelMoments<T>& mo, const T conic[3], T w, T v_u[2], T v_conic[3], T& v_w) {
  v_w = mo.s0;
  v_u[0] = w * (conic[0] * mo.sx + conic[1] * mo.sy);
  v_u[1] = w * (conic[1] * mo.sx + conic[2] * mo.sy);
  v_conic[0] = T(-0.5) * w * mo.sxx;
  v_conic[1] = -w * mo.sxy;
  v_conic[2] = T(-0.5) * w * mo.syy;
}

// ---------------------------------------------------------------------------------------------
// 3D voxelisation (forward only): the maths of cryogs.render.reference.voxelize_splat.
//   centre (voxels) c = mu / p + c0;  Sigma_vox = R diag(s^2) R^T / p^2
//   q = d^T Sigma_vox^-1 d = sum_j ((R^T d)_j p / s_j)^2    (no matrix inverse, no cancellation)
//   density = m / ((2 pi)^1.5 sqrt(det Sigma_vox)) = m p^3 / ((2 pi)^1.5 |s0 s1 s2|)
//   radii_k = k sqrt(Sigma_vox[k][k]) = k sqrt(sum_j (R[k][j] s_j)^2) / p
// ---------------------------------------------------------------------------------------------
template <typename T>
struct VoxelGauss {
  T c[3];     // centre in voxels (x, y, z)
  T W[9];     // row j: R[:, j]^T p / s_j, so q = |W d|^2
  T dens;     // peak density (mass per voxel)
  T radii[3]; // cutoff box half-extents (x, y, z), voxels
  bool ok;
};

template <typename T>
GM_HD VoxelGauss<T> voxel_setup(const T mu[3], const T quat[4], const T s[3], T m, T p, T c0, T cutoff) {
  VoxelGauss<T> g;
  T R[9];
  quat_to_rotmat(quat, R);
  bool ok = true;
GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    g.c[k] = mu[k] / p + c0;
    ok = ok && is_finite(g.c[k]);
  }
GM_UNROLL
  for (int j = 0; j < 3; ++j) {
    const T f = p / s[j];
GM_UNROLL
    for (int k = 0; k < 3; ++k) {
      g.W[3 * j + k] = R[3 * k + j] * f;
      ok = ok && is_finite(g.W[3 * j + k]);
    }
  }
GM_UNROLL
  for (int k = 0; k < 3; ++k) {
    const T l0 = R[3 * k] * s[0], l1 = R[3 * k + 1] * s[1], l2 = R[3 * k + 2] * s[2];
    g.radii[k] = cutoff * gm_sqrt(l0 * l0 + l1 * l1 + l2 * l2) / p;
    ok = ok && is_finite(g.radii[k]);
  }
  const T vol = gm_abs(s[0] * s[1] * s[2]) / (p * p * p);  // sqrt(det Sigma_vox)
  g.dens = m / (T(TWO_PI_POW_1_5) * vol);
  ok = ok && vol > T(0) && is_finite(g.dens);
  g.ok = ok;
  return g;
}

// q of a voxel at offset d = (dx, dy, dz) from the centre.
template <typename T>
GM_HD T voxel_q(const VoxelGauss<T>& g, T dx, T dy, T dz) {
  const T z0 = g.W[0] * dx + g.W[1] * dy + g.W[2] * dz;
  const T z1 = g.W[3] * dx + g.W[4] * dy + g.W[5] * dz;
  const T z2 = g.W[6] * dx + g.W[7] * dy + g.W[8] * dz;
  return z0 * z0 + z1 * z1 + z2 * z2;
}

template <typename T>
GM_HD T voxel_eval(const VoxelGauss<T>& g, T dx, T dy, T dz, T k2) {
  const T q = voxel_q(g, dx, dy, dz);
  return q <= k2 ? g.dens * gm_exp(T(-0.5) * q) : T(0);
}

}  // namespace cryogs

#include "common.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "gaussian_math.cuh"

namespace cryogs {

namespace {

bool poison_from_env() {
  const char* v = std::getenv("CRYOGS_DEBUG_POISON");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{poison_from_env()};
  return flag;
}

std::string shape_str(std::initializer_list<int64_t> shape) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (int64_t s : shape) {
    if (!first) os << ", ";
    first = false;
    if (s < 0) {
      os << "*";
    } else {
      os << s;
    }
  }
  os << "]";
  return os.str();
}

}  // namespace

bool debug_poison() { return poison_flag().load(); }

void set_debug_poison(bool on) { poison_flag().store(on); }

void maybe_poison(at::Tensor& t) {
  if (!debug_poison() || !t.defined() || t.numel() == 0) return;
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() == at::kInt) {
    t.fill_(std::numeric_limits<int32_t>::min() + 7);
  } else if (t.scalar_type() == at::kLong) {
    t.fill_(std::numeric_limits<int64_t>::min() + 7);
  } else {
    t.fill_(0x5a);
  }
}

at::Tensor alloc_out(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  maybe_poison(t);
  return t;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                  at::ScalarType dtype, bool cuda) {
  TORCH_CHECK(t.defined(), "cryogs.", op, ": ", name, " is missing (undefined tensor)");
  const bool gpu = cuda && KERNELS_ON_GPU;
  TORCH_CHECK(gpu ? t.is_cuda() : t.device().is_cpu(), "cryogs.", op, ": ", name, " must be a ", gpu ? "CUDA" : "CPU",
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "cryogs.", op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  if (ok) {
    int64_t d = 0;
    for (int64_t s : shape) {
      if (s >= 0 && t.size(d) != s) ok = false;
      ++d;
    }
  }
  TORCH_CHECK(ok, "cryogs.", op, ": ", name, " must have shape ", shape_str(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "cryogs.", op, ": ", name, " must be contiguous (call .contiguous())");
}

void check_same_device(const char* op, const at::Tensor& ref, std::initializer_list<at::Tensor> others) {
  for (const at::Tensor& t : others) {
    TORCH_CHECK(t.device() == ref.device(), "cryogs.", op, ": all tensors must be on one device, got ",
                ref.device(), " and ", t.device());
  }
}

void check_geometry(const char* op, int64_t box_size, double pixel_size, double cutoff) {
  TORCH_CHECK(box_size > 0 && box_size <= 65536, "cryogs.", op, ": box_size must be in [1, 65536], got ",
              box_size);
  TORCH_CHECK(pixel_size > 0 && std::isfinite(pixel_size), "cryogs.", op,
              ": pixel_size must be positive and finite, got ", pixel_size);
  TORCH_CHECK(cutoff >= 0 && std::isfinite(cutoff), "cryogs.", op, ": cutoff must be >= 0 and finite, got ",
              cutoff);
}

int64_t tiles_per_side(int64_t box_size) { return (box_size + TILE_SIZE - 1) / TILE_SIZE; }

}  // namespace cryogs

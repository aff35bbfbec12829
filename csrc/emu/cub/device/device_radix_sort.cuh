// Emulated build: CUB's DeviceRadixSort::SortPairs on a DoubleBuffer, a stable radix sort that
// leaves the result in the buffer CUB 2.x would (cccl/cub/device/dispatch/dispatch_radix_sort.cuh),
// so the caller's handling of both parities runs:
//   - at most 256 * 19 = 4864 items (SingleTilePolicy): one sort of all the bits, Current() into
//     Alternate(); the selector flips once;
//   - more items (onesweep, 8-bit digits): one pass per digit of [begin_bit, end_bit), each from
//     Current() into Alternate(); the selector flips every pass, so an even number of passes leaves
//     the result in buffer 0.
// Its scratch lives in the caller's temp storage (sized by a temp == nullptr query), so
// AddressSanitizer checks that the caller allocates what it was asked for.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>

#include <cuda_runtime.h>

namespace emu {
void record_sort(int passes);  // runtime.cpp: 0 = single tile, else the number of onesweep passes
}  // namespace emu

namespace cub {

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2];
  int selector;
  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate}, selector(0) {}
  T* Current() const { return d_buffers[selector]; }
  T* Alternate() const { return d_buffers[selector ^ 1]; }
};

struct DeviceRadixSort {
  static constexpr int64_t SINGLE_TILE_ITEMS = 256 * 19;
  static constexpr int DIGIT_BITS = 8;

  template <typename K, typename V, typename NumItemsT>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, DoubleBuffer<K>& keys, DoubleBuffer<V>& values,
                               NumItemsT num_items, int begin_bit = 0, int end_bit = 8 * sizeof(K),
                               cudaStream_t = nullptr) {
    const int64_t n = static_cast<int64_t>(num_items);
    if (n == 0 || begin_bit == end_bit) {  // nothing to sort: CUB leaves both buffers alone
      if (temp == nullptr) temp_bytes = 1;
      return cudaSuccess;
    }
    const bool single_tile = n <= SINGLE_TILE_ITEMS;
    const size_t need = single_tile ? n * sizeof(int64_t) : (1 << DIGIT_BITS) * sizeof(int64_t);
    if (temp == nullptr) {
      temp_bytes = need;
      return cudaSuccess;
    }
    if (temp_bytes < need) return 1;  // cudaErrorInvalidValue
    const auto digit = [](K key, int lo, int bits) {
      return (static_cast<uint64_t>(key) >> lo) & ((uint64_t(1) << bits) - 1);
    };
    if (single_tile) {
      int64_t* order = static_cast<int64_t*>(temp);  // [n]
      std::iota(order, order + n, int64_t(0));
      const K* k = keys.Current();
      std::stable_sort(order, order + n, [&](int64_t a, int64_t b) {
        return digit(k[a], begin_bit, end_bit - begin_bit) < digit(k[b], begin_bit, end_bit - begin_bit);
      });
      for (int64_t i = 0; i < n; ++i) {
        keys.Alternate()[i] = k[order[i]];
        values.Alternate()[i] = values.Current()[order[i]];
      }
      keys.selector ^= 1;
      values.selector ^= 1;
      emu::record_sort(0);
      return cudaSuccess;
    }
    int passes = 0;
    for (int lo = begin_bit; lo < end_bit; lo += DIGIT_BITS, ++passes) {
      const int bits = std::min(DIGIT_BITS, end_bit - lo);
      int64_t* start = static_cast<int64_t*>(temp);  // [256] first output slot of each digit
      std::fill(start, start + (1 << DIGIT_BITS), int64_t(0));
      const K* k = keys.Current();
      for (int64_t i = 0; i < n; ++i) ++start[digit(k[i], lo, bits)];
      std::exclusive_scan(start, start + (1 << DIGIT_BITS), start, int64_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t o = start[digit(k[i], lo, bits)]++;
        keys.Alternate()[o] = k[i];
        values.Alternate()[o] = values.Current()[i];
      }
      keys.selector ^= 1;
      values.selector ^= 1;
    }
    emu::record_sort(passes);
    return cudaSuccess;
  }
};

}  // namespace cub

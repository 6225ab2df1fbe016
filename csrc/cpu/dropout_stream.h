// The words of the dropout stream (docs/dropout.md) for blocks of memory positions of a dense
// tensor, as the CPU kernels read them: defined in dropout.cpp (the generator's vector versions
// live there), shared with the kernels that fuse dropout after another op (batch norm).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common/philox.h"
#include "simd.h"

namespace dlk::cpu {

// Words per block buffer: a row-major block of m words starting mid-counter needs up to m + 6.
constexpr int64_t kWordBuf = kBlock + 8;

// The functions are internal to the extension (hidden: called directly across its files, never
// through the PLT).
#pragma GCC visibility push(hidden)

// The words of counters (c0 + j, c1, 0, 0), j < nq, interleaved (out[4j + w] = word w); c0 + j
// must not wrap. One version per capability level.
void philox_row(uint32_t c0, uint32_t c1, int64_t nq, uint32_t k0, uint32_t k1, uint32_t* out);
// out[i] = the word of logical index idx[i], i < n (a whole evaluation per element).
void philox_at(const int64_t* idx, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1);

// The words of logical indices [i0, i0 + m), m <= kBlock, into buf (kWordBuf); returns where
// they start (buf + i0 mod 4).
const uint32_t* row_major_words(uint64_t i0, int64_t m, uint32_t k0, uint32_t k1, uint32_t* buf);

// out[k] = the logical index of memory position o + k, k < m (an odometer over the map's dims).
void fill_indices(const IndexMap& map, int64_t o, int64_t m, int64_t* out);

#pragma GCC visibility pop

// Where a kernel's words come from, for the memory positions of the dense input.
struct Stream {
  enum Kind { kRowMajor, kPerElement, kGrid } kind = kRowMajor;
  uint32_t k0 = 0, k1 = 0;
  IndexMap map{};
  std::vector<uint32_t> grid;  // kGrid: the words of the (N, C) grid, row-major

  // More coalesced dims than IndexMap holds: the caller computes on a contiguous copy.
  bool too_deep() const { return map.ndim > kIndexMapMaxDims; }

  // The words of memory positions [o, o + m), m <= kBlock (wbuf: kWordBuf, ibuf: kBlock).
  const uint32_t* words(int64_t o, int64_t m, uint32_t* wbuf, int64_t* ibuf) const {
    switch (kind) {
      case kRowMajor:
        return row_major_words(uint64_t(o), m, k0, k1, wbuf);
      case kPerElement:
        fill_indices(map, o, m, ibuf);
        philox_at(ibuf, wbuf, m, k0, k1);
        return wbuf;
      case kGrid:
      default:
        fill_indices(map, o, m, ibuf);
        for (int64_t k = 0; k < m; ++k) wbuf[k] = grid[ibuf[k]];
        return wbuf;
    }
  }
};

// The stream of seed over the dense tensor xd (per_channel: the words of its (N, C) grid).
#pragma GCC visibility push(hidden)
Stream make_stream(const at::Tensor& xd, int64_t seed, bool per_channel);
#pragma GCC visibility pop

}  // namespace dlk::cpu

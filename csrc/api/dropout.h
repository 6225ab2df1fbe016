// Dropout family (docs/dropout.md): dropout from the Philox4x32-10 stream, alone and fused with
// leaky ReLU / PReLU, forward and backward, plus the stream itself (philox4x32_10, dropout_bits)
// for tests. Declared for each backend namespace: dlk::cpu (csrc/cpu/dropout.cpp) and, in a CUDA
// build, dlk::cuda (csrc/cuda/dropout*); bound to Python in csrc/bind/dropout.cpp.
//
// seed is the two's-complement int64 bit pattern of the uint64 seed; 0 <= p < 1 (the Python
// caller handles p == 0, p == 1 and eval). Outputs are in x's dtype and in
// at::empty_like(dense(x))'s memory layout.
#pragma once
#include "declare.h"

#define DLK_DROPOUT_API                                                                            \
  /* Philox4x32-10 of int64 [n, 4] counters (32-bit words; the low 32 bits are used) under key   \
     (key0, key1) (low 32 bits each): int64 [n, 4] of words in [0, 2^32). */                     \
  at::Tensor philox4x32_10(const at::Tensor& counter, int64_t key0, int64_t key1);                 \
  /* The word of every element's logical index: int64, x's shape, contiguous. */                 \
  at::Tensor dropout_bits(const at::Tensor& x, int64_t seed);                                      \
  /* y = x * m; per_channel: m of index n * C + c over dims 0 and 1. Also the backward. */       \
  at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, bool per_channel);               \
  at::Tensor leaky_relu_dropout(const at::Tensor& x, double negative_slope, double p, int64_t seed); \
  at::Tensor leaky_relu_dropout_backward(const at::Tensor& grad, const at::Tensor& x,             \
                                         double negative_slope, double p, int64_t seed);          \
  at::Tensor prelu_dropout(const at::Tensor& x, const at::Tensor& weight, double p, int64_t seed); \
  std::tuple<at::Tensor, at::Tensor> prelu_dropout_backward(                                       \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, double p, int64_t seed);

DLK_DECLARE_API(DLK_DROPOUT_API)

// DLK_DECLARE_API(API): declares a family's tensor-level functions (a DLK_<FAMILY>_API list) for
// each backend namespace this build has: dlk::cpu, and dlk::cuda in a CUDA build.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#ifdef DLK_WITH_CUDA
#define DLK_DECLARE_CUDA_API(...) \
  namespace dlk::cuda {           \
  __VA_ARGS__                     \
  }
#else
#define DLK_DECLARE_CUDA_API(...)
#endif

// Variadic: the expanded list holds commas (parameter lists).
#define DLK_DECLARE_API(...) \
  namespace dlk::cpu {       \
  __VA_ARGS__                \
  }                          \
  DLK_DECLARE_CUDA_API(__VA_ARGS__)

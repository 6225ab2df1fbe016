// DLK_DECLARE_API(API): declares a family's tensor-level functions (a DLK_<FAMILY>_API list) for
// each backend namespace this build has: dlk::cpu, and dlk::cuda in a CUDA build.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#ifdef DLK_WITH_CUDA
#define DLK_DECLARE_CUDA_API(API) \
  namespace dlk::cuda {           \
  API                             \
  }
#else
#define DLK_DECLARE_CUDA_API(API)
#endif

#define DLK_DECLARE_API(API) \
  namespace dlk::cpu {       \
  API                        \
  }                          \
  DLK_DECLARE_CUDA_API(API)

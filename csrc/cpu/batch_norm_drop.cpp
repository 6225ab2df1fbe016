// Batch norm's dropout (batch_norm_impl.h): the dropout multipliers applied to an L1 block, one
// version per capability level. The blocks' words come from the dropout stream (dropout_stream.h).
#include <cstdint>

#include "../common/philox.h"
#include "batch_norm_impl.h"
#include "simd.h"

namespace dlk::cpu {
namespace {

// In place: the forward's act(z) block. Same index on both sides, so no restrict is needed.
template <typename T>
DLK_INLINE void mask_scale_body(T* v, const uint32_t* __restrict__ w, int64_t n, uint32_t t, T s) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * dropout_multiplier(w[i], t, s);
}

template <typename T>
DLK_INLINE void mask_mul_body(const T* __restrict__ g, const uint32_t* __restrict__ w, T* __restrict__ out,
                              int64_t n, uint32_t t, T s) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * dropout_multiplier(w[i], t, s);
}

DLK_MULTIVERSION(void, scale_by_mask, (float* v, const uint32_t* w, int64_t n, uint32_t t, float s), (v, w, n, t, s),
                 mask_scale_body)
DLK_MULTIVERSION(void, scale_by_mask, (double* v, const uint32_t* w, int64_t n, uint32_t t, double s),
                 (v, w, n, t, s), mask_scale_body)
DLK_MULTIVERSION(void, mul_by_mask, (const float* g, const uint32_t* w, float* out, int64_t n, uint32_t t, float s),
                 (g, w, out, n, t, s), mask_mul_body)
DLK_MULTIVERSION(void, mul_by_mask,
                 (const double* g, const uint32_t* w, double* out, int64_t n, uint32_t t, double s),
                 (g, w, out, n, t, s), mask_mul_body)

}  // namespace

void mask_scale(float* v, const uint32_t* w, int64_t n, uint32_t t, float s) { scale_by_mask(v, w, n, t, s); }
void mask_scale(double* v, const uint32_t* w, int64_t n, uint32_t t, double s) { scale_by_mask(v, w, n, t, s); }
void mask_mul(const float* g, const uint32_t* w, float* out, int64_t n, uint32_t t, float s) {
  mul_by_mask(g, w, out, n, t, s);
}
void mask_mul(const double* g, const uint32_t* w, double* out, int64_t n, uint32_t t, double s) {
  mul_by_mask(g, w, out, n, t, s);
}

}  // namespace dlk::cpu

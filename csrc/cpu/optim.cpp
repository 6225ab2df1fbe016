// Fused Adam/AdamW/RMSprop steps and the global gradient norm on the CPU. Every parameter of a
// call is cut into chunks, and one OpenMP region runs over the list of (tensor, chunk) items, so
// many small tensors cost one fork, not one each. Within a chunk, plain loops compiled per capability level (simd.h)
// over csrc/common/optim.h vectorize; fp16/bf16 storage is converted to float block by block.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <optional>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../api/optim.h"
#include "../common/optim.h"
#include "loadstore.h"

namespace dlk::cpu {
namespace {

// ---- SIMD loops over one block (compute type float or double) ----

// A block step of either optimizer: param, grad, three state streams (null where unused), n,
// coefficients, grad transform; a table of these holds the clones of the flags' combinations.
template <typename T, template <typename> class Coefs>
using BlockFn = void (*)(T*, const T*, T*, T*, T*, int64_t, const Coefs<T>&, const GradXform<T>&);

// The blocks take lerp's |weight| < 0.5 as a constant (a branch in the loop would stop
// vectorization); a weight >= 0.5 (beta1 or alpha <= 0.5, rare) runs the unvectorized form.
template <int WD, bool AMS, typename T, typename B>
DLK_INLINE void adam_body(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, const AdamCoefs<T>& cr,
                          const GradXform<T>& xr, B small) {
  // Local copies: the compiler cannot prove the stores to p/m/v leave *cr and *xr alone, and
  // would reload them every element instead of vectorizing.
  const AdamCoefs<T> c = cr;
  const GradXform<T> x = xr;
  for (int64_t i = 0; i < n; ++i) {
    T dummy = 0;
    adam_element<WD, AMS>(p[i], m[i], v[i], AMS ? vmax[i] : dummy, transform_grad(g[i], x), c,
                          small);
  }
}

template <int WD, bool AMS, typename T>
DLK_INLINE void adam_block_body(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, const AdamCoefs<T>& c,
                                const GradXform<T>& x) {
  adam_body<WD, AMS>(p, g, m, v, vmax, n, c, x, std::true_type{});
}
#define DLK_ADAM_CLONE(T, WD, AMS)                                                                             \
  DLK_MULTIVERSION(void, adam_block_##WD##_##AMS, (T* p, const T* g, T* m, T* v, T* vmax, int64_t n,           \
                   const AdamCoefs<T>& c, const GradXform<T>& x), (p, g, m, v, vmax, n, c, x),                 \
                   adam_block_body<WD, AMS>)
#define DLK_ADAM_CLONES(T)                                                                     \
  DLK_ADAM_CLONE(T, 0, 0) DLK_ADAM_CLONE(T, 0, 1) DLK_ADAM_CLONE(T, 1, 0)                      \
  DLK_ADAM_CLONE(T, 1, 1) DLK_ADAM_CLONE(T, 2, 0) DLK_ADAM_CLONE(T, 2, 1)
DLK_ADAM_CLONES(float)
DLK_ADAM_CLONES(double)

// The unvectorized form, for a lerp weight >= 0.5 (rare).
template <int WD, bool AMS, typename T>
void adam_block_big(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, const AdamCoefs<T>& c, const GradXform<T>& x) {
  adam_body<WD, AMS>(p, g, m, v, vmax, n, c, x, false);
}

template <typename T>
BlockFn<T, AdamCoefs> adam_block(int wd, bool ams, bool small) {
  static const BlockFn<T, AdamCoefs> table[3][2] = {{adam_block_0_0, adam_block_0_1},
                                                     {adam_block_1_0, adam_block_1_1},
                                                     {adam_block_2_0, adam_block_2_1}};
  static const BlockFn<T, AdamCoefs> big[3][2] = {{adam_block_big<0, false>, adam_block_big<0, true>},
                                                   {adam_block_big<1, false>, adam_block_big<1, true>},
                                                   {adam_block_big<2, false>, adam_block_big<2, true>}};
  return small ? table[wd][ams] : big[wd][ams];
}

template <bool WD, bool CEN, bool MOM, typename T, typename B>
DLK_INLINE void rmsprop_body(T* p, const T* g, T* sq, T* ga, T* buf, int64_t n,
                             const RMSpropCoefs<T>& cr, const GradXform<T>& xr, B small) {
  const RMSpropCoefs<T> c = cr;  // local copies, as in adam_body
  const GradXform<T> x = xr;
  for (int64_t i = 0; i < n; ++i) {
    T d1 = 0, d2 = 0;
    rmsprop_element<WD, CEN, MOM>(p[i], sq[i], CEN ? ga[i] : d1, MOM ? buf[i] : d2,
                                  transform_grad(g[i], x), c, small);
  }
}

template <bool WD, bool CEN, bool MOM, typename T>
DLK_INLINE void rms_block_body(T* p, const T* g, T* sq, T* ga, T* buf, int64_t n, const RMSpropCoefs<T>& c,
                               const GradXform<T>& x) {
  rmsprop_body<WD, CEN, MOM>(p, g, sq, ga, buf, n, c, x, std::true_type{});
}
#define DLK_RMS_CLONE(T, WD, CEN, MOM)                                                                         \
  DLK_MULTIVERSION(void, rms_block_##WD##CEN##MOM, (T* p, const T* g, T* sq, T* ga, T* buf, int64_t n,         \
                   const RMSpropCoefs<T>& c, const GradXform<T>& x), (p, g, sq, ga, buf, n, c, x),             \
                   rms_block_body<WD, CEN, MOM>)
#define DLK_RMS_CLONES(T)                                                                      \
  DLK_RMS_CLONE(T, 0, 0, 0) DLK_RMS_CLONE(T, 0, 0, 1) DLK_RMS_CLONE(T, 0, 1, 0)                \
  DLK_RMS_CLONE(T, 0, 1, 1) DLK_RMS_CLONE(T, 1, 0, 0) DLK_RMS_CLONE(T, 1, 0, 1)                \
  DLK_RMS_CLONE(T, 1, 1, 0) DLK_RMS_CLONE(T, 1, 1, 1)
DLK_RMS_CLONES(float)
DLK_RMS_CLONES(double)

// The unvectorized form, for a lerp weight >= 0.5 (rare); only centered RMSprop uses lerp.
template <bool WD, bool MOM, typename T>
void rms_block_big(T* p, const T* g, T* sq, T* ga, T* buf, int64_t n, const RMSpropCoefs<T>& c, const GradXform<T>& x) {
  rmsprop_body<WD, true, MOM>(p, g, sq, ga, buf, n, c, x, false);
}

template <typename T>
BlockFn<T, RMSpropCoefs> rms_block(bool wd, bool cen, bool mom, bool small) {
  static const BlockFn<T, RMSpropCoefs> table[8] = {rms_block_000, rms_block_001, rms_block_010,
                                                     rms_block_011, rms_block_100, rms_block_101,
                                                     rms_block_110, rms_block_111};
  static const BlockFn<T, RMSpropCoefs> big[2][2] = {{rms_block_big<false, false>, rms_block_big<false, true>},
                                                      {rms_block_big<true, false>, rms_block_big<true, true>}};
  return small ? table[wd * 4 + cen * 2 + mom] : big[wd][mom];
}

// Norm partials of one block: sum |g|^p (p = 2, 1 or general) or max |g| (p = inf), of the
// transformed gradient. 16 independent lanes let the compiler vectorize the reduction.
constexpr int kLanes = 16;
enum NormKind : int { kNorm2, kNorm1, kNormInf, kNormP };

template <int K, typename T>
DLK_INLINE T norm_body(const T* g, int64_t n, T inv_scale, T clip, T p) {
  T acc[kLanes] = {};
  auto term = [&](T raw) {
    const T a = std::abs(clamp_nan(raw * inv_scale, -clip, clip));
    if constexpr (K == kNorm2) return a * a;
    else if constexpr (K == kNormP) return T(std::pow(a, p));
    else return a;
  };
  auto add = [](T s, T t) {
    if constexpr (K == kNormInf) return (t > s || t != t) ? t : s;
    else return s + t;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = add(acc[j], term(g[i + j]));
  for (; i < n; ++i) acc[0] = add(acc[0], term(g[i]));
  T total = acc[0];
  for (int j = 1; j < kLanes; ++j) total = add(total, acc[j]);
  return total;
}
#define DLK_NORM_CLONE(T, K) \
  DLK_MULTIVERSION(T, norm_block_##K, (const T* g, int64_t n, T s, T c, T p), (g, n, s, c, p), norm_body<K>)
DLK_NORM_CLONE(float, 0) DLK_NORM_CLONE(float, 1) DLK_NORM_CLONE(float, 2) DLK_NORM_CLONE(float, 3)
DLK_NORM_CLONE(double, 0) DLK_NORM_CLONE(double, 1) DLK_NORM_CLONE(double, 2) DLK_NORM_CLONE(double, 3)

template <typename T>
T norm_block(int kind, const T* g, int64_t n, T s, T c, T p) {
  switch (kind) {
    case kNorm2: return norm_block_0(g, n, s, c, p);
    case kNorm1: return norm_block_1(g, n, s, c, p);
    case kNormInf: return norm_block_2(g, n, s, c, p);
    default: return norm_block_3(g, n, s, c, p);
  }
}

// ---- work lists ----

struct Item {
  int64_t tensor, begin, end;
};

std::vector<Item> work_items(const std::vector<at::Tensor>& ts) {
  std::vector<Item> items;
  for (int64_t t = 0; t < int64_t(ts.size()); ++t)
    for (int64_t b = 0, n = ts[t].numel(); b < n; b += kGrain)
      items.push_back({t, b, std::min(n, b + kGrain)});
  return items;
}

// Items per thread at least: below two chunks of work in all, one thread does everything (a
// fork/join costs more than the work; on a busy machine, far more).
int64_t items_grain(const std::vector<Item>& items) {
  int64_t total = 0;
  for (const Item& it : items) total += it.end - it.begin;
  return total < 2 * kGrain ? std::max<int64_t>(1, int64_t(items.size())) : 1;
}

template <typename T>
T scalar_or(const std::optional<at::Tensor>& t, T fallback) {
  return t.has_value() ? T(t->to(at::kDouble).item<double>()) : fallback;
}

void check_list(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& ref,
                const char* name, at::ScalarType dtype) {
  TORCH_CHECK(ts.size() == ref.size(), "dlkernels optim: ", name, " has ", ts.size(),
              " tensors, expected ", ref.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device().is_cpu(), "dlkernels cpu backend: ", name, " must be CPU tensors");
    TORCH_CHECK(ts[i].numel() == ref[i].numel(), "dlkernels optim: ", name, "[", i,
                "] has a different size than params[", i, "]");
    TORCH_CHECK(ts[i].scalar_type() == dtype, "dlkernels optim: ", name, "[", i, "] must be ",
                dtype, ", got ", ts[i].scalar_type());
    TORCH_CHECK(ts[i].is_contiguous() || ts[i].is_non_overlapping_and_dense(),
                "dlkernels optim: ", name, "[", i, "] must be dense");
  }
}

// Dense tensors are walked in memory order, so p, g and state must share strides.
void check_same_strides(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& ref,
                        const char* name) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(ts[i].numel() <= 1 || ts[i].strides() == ref[i].strides(), "dlkernels optim: ",
                name, "[", i, "] must have the same strides as params[", i, "]");
}

// An optional state list (checked only when the step uses it): check_list, then its strides.
void check_state(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& params, const char* name,
                 at::ScalarType dtype) {
  check_list(ts, params, name, dtype);
  check_same_strides(ts, params, name);
}

at::ScalarType state_type(const std::vector<at::Tensor>& state, const at::Tensor& p) {
  return state.empty() ? p.scalar_type() : state[0].scalar_type();
}

// Returns true when the step is skipped (the skip flag is set).
bool skipped(const std::optional<at::Tensor>& skip) {
  return skip.has_value() && skip->to(at::kDouble).item<double>() != 0;
}

template <typename F>
void dispatch_storage(at::ScalarType param, at::ScalarType state, F&& f) {
  // (param storage, state storage): same dtype, or fp16/bf16 params with float32 state.
  if (param == at::kFloat && state == at::kFloat) return f(float{}, float{});
  if (param == at::kDouble && state == at::kDouble) return f(double{}, double{});
  if (param == at::kHalf && state == at::kHalf) return f(c10::Half{}, c10::Half{});
  if (param == at::kHalf && state == at::kFloat) return f(c10::Half{}, float{});
  if (param == at::kBFloat16 && state == at::kBFloat16) return f(c10::BFloat16{}, c10::BFloat16{});
  if (param == at::kBFloat16 && state == at::kFloat) return f(c10::BFloat16{}, float{});
  TORCH_CHECK(false, "dlkernels optim: unsupported (param, state) dtypes (", param, ", ", state,
              "); state must have the param dtype, or float32 for float16/bfloat16 params");
}

void increment_steps(const std::vector<at::Tensor>& steps) {
  for (const auto& s : steps) {
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                "dlkernels optim: each step must be a float32 CPU tensor with one element");
    *s.mutable_data_ptr<float>() += 1.0f;
  }
}

// An optimizer step's loop over every block of every item: the param and up to three state
// streams (absent: null) seen in the compute type, step(t, p, g, s0, s1, s2, n) run on them (t:
// the tensor's index), then written back.
template <typename S, typename M, typename F>
void step_blocks(const std::vector<Item>& items, const std::vector<at::Tensor>& params,
                 const std::vector<at::Tensor>& grads, const std::array<const std::vector<at::Tensor>*, 3>& state,
                 F&& step) {
  using C = compute_t<S>;
  at::parallel_for(0, int64_t(items.size()), items_grain(items), [&](int64_t b, int64_t e) {
    C pb[kBlock], gb[kBlock], sb[3][kBlock];
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      S* p = params[it.tensor].mutable_data_ptr<S>();
      const S* g = grads[it.tensor].const_data_ptr<S>();
      M* sp[3];
      for (int j = 0; j < 3; ++j) sp[j] = state[j] ? (*state[j])[it.tensor].mutable_data_ptr<M>() : nullptr;
      for (int64_t i = it.begin; i < it.end; i += kBlock) {
        const int64_t n = std::min(kBlock, it.end - i);
        C* sc[3];
        for (int j = 0; j < 3; ++j) sc[j] = sp[j] ? load(sp[j] + i, sb[j], n) : nullptr;
        step(it.tensor, load(p + i, pb, n), load(g + i, gb, n), sc[0], sc[1], sc[2], n);
        store(pb, p + i, n);
        for (int j = 0; j < 3; ++j)
          if (sp[j]) store(sb[j], sp[j] + i, n);
      }
    }
  });
}

}  // namespace

at::Tensor grad_norm(const std::vector<at::Tensor>& grads, double norm_type, double clip_value,
                     const std::optional<at::Tensor>& grad_scale) {
  const int kind = norm_type == 2.0 ? kNorm2
                   : norm_type == 1.0 ? kNorm1
                   : std::isinf(norm_type) ? kNormInf
                                           : kNormP;
  TORCH_CHECK(norm_type > 0, "dlkernels grad_norm: norm_type must be > 0 or inf, got ", norm_type);
  bool all_double = !grads.empty();
  for (const auto& g : grads) {
    TORCH_CHECK(g.device().is_cpu(), "dlkernels cpu backend: grads must be CPU tensors");
    TORCH_CHECK(g.is_non_overlapping_and_dense(), "dlkernels grad_norm: grads must be dense");
    all_double &= g.scalar_type() == at::kDouble;
  }
  const double inv_scale = 1.0 / scalar_or<double>(grad_scale, 1.0);
  const auto items = work_items(grads);
  std::vector<double> part(items.size());
  at::parallel_for(0, int64_t(items.size()), items_grain(items), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      const at::Tensor& g = grads[it.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_norm", [&] {
        using C = compute_t<scalar_t>;
        C buf[kBlock];
        const scalar_t* base = g.const_data_ptr<scalar_t>();
        double acc = 0.0;
        for (int64_t i = it.begin; i < it.end; i += kBlock) {
          const int64_t m = std::min(kBlock, it.end - i);
          const double r = norm_block<C>(kind, load(base + i, buf, m), m, C(inv_scale),
                                         C(clip_value), C(norm_type));
          acc = kind == kNormInf ? ((r > acc || r != r) ? r : acc) : acc + r;
        }
        part[k] = acc;
      });
    }
  });
  // Added in item order: the result does not depend on the number of threads.
  double total = 0;
  for (double r : part) total = kind == kNormInf ? ((r > total || r != r) ? r : total) : total + r;
  if (kind == kNorm2) total = std::sqrt(total);
  else if (kind == kNormP) total = std::pow(total, 1.0 / norm_type);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(all_double ? at::kDouble : at::kFloat));
  if (all_double) *out.mutable_data_ptr<double>() = total;
  else *out.mutable_data_ptr<float>() = float(total);
  return out;
}

void adam_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                const std::vector<at::Tensor>& grads, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& skip,
                double clip_value, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  if (params.empty() || skipped(skip)) return;
  const at::ScalarType pt = params[0].scalar_type(), st = state_type(exp_avgs, params[0]);
  check_list(params, params, "params", pt);
  check_list(grads, params, "grads", pt);
  check_list(exp_avgs, params, "exp_avgs", st);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", st);
  check_same_strides(grads, params, "grads");
  check_same_strides(exp_avgs, params, "exp_avgs");
  check_same_strides(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) check_state(max_exp_avg_sqs, params, "max_exp_avg_sqs", st);
  TORCH_CHECK(steps.size() == params.size(), "dlkernels optim: one step per param expected");
  increment_steps(steps);
  const double inv_scale = 1.0 / scalar_or<double>(grad_scale, 1.0);
  const double coef = scalar_or<double>(clip_coef, 1.0);
  const int wd = weight_decay == 0 ? kNoDecay : decoupled_weight_decay ? kDecoupled : kL2;
  const auto items = work_items(params);
  dispatch_storage(pt, st, [&](auto ptag, auto stag) {
    using S = decltype(ptag);
    using M = decltype(stag);
    using C = compute_t<S>;
    std::vector<AdamCoefs<C>> coefs;
    for (const auto& s : steps)
      coefs.push_back(adam_coefs<C>(*s.const_data_ptr<float>(), lr, beta1, beta2, eps, weight_decay));
    // clip_grad_norm_ multiplies float32 grads by a float32 coefficient: round it the same way.
    const GradXform<C> x{C(inv_scale), C(clip_value), C(coef), C(maximize ? -1 : 1)};
    const auto block = adam_block<C>(wd, amsgrad, lerp_small(C(1.0 - beta1)));
    step_blocks<S, M>(items, params, grads, {&exp_avgs, &exp_avg_sqs, amsgrad ? &max_exp_avg_sqs : nullptr},
                      [&](int64_t t, C* p, const C* g, C* m, C* v, C* vmax, int64_t n) {
                        block(p, g, m, v, vmax, n, coefs[t], x);
                      });
  });
}

void rmsprop_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& square_avgs,
                   const std::vector<at::Tensor>& grad_avgs,
                   const std::vector<at::Tensor>& momentum_buffers,
                   const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& grads,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& skip, double clip_value, double lr,
                   double alpha, double eps, double weight_decay, double momentum, bool centered,
                   bool maximize) {
  if (params.empty() || skipped(skip)) return;
  const at::ScalarType pt = params[0].scalar_type(), st = state_type(square_avgs, params[0]);
  const bool mom = momentum > 0;
  check_list(params, params, "params", pt);
  check_list(grads, params, "grads", pt);
  check_list(square_avgs, params, "square_avgs", st);
  check_same_strides(grads, params, "grads");
  check_same_strides(square_avgs, params, "square_avgs");
  if (centered) check_state(grad_avgs, params, "grad_avgs", st);
  if (mom) check_state(momentum_buffers, params, "momentum_buffers", st);
  TORCH_CHECK(steps.size() == params.size(), "dlkernels optim: one step per param expected");
  increment_steps(steps);
  const double inv_scale = 1.0 / scalar_or<double>(grad_scale, 1.0);
  const double coef = scalar_or<double>(clip_coef, 1.0);
  const auto items = work_items(params);
  dispatch_storage(pt, st, [&](auto ptag, auto stag) {
    using S = decltype(ptag);
    using M = decltype(stag);
    using C = compute_t<S>;
    const RMSpropCoefs<C> c{C(alpha), C(1.0 - alpha), C(eps), C(weight_decay), C(momentum), C(-lr)};
    const GradXform<C> x{C(inv_scale), C(clip_value), C(coef), C(maximize ? -1 : 1)};
    const auto block = rms_block<C>(weight_decay != 0, centered, mom, !centered || lerp_small(C(1.0 - alpha)));
    step_blocks<S, M>(items, params, grads,
                      {&square_avgs, centered ? &grad_avgs : nullptr, mom ? &momentum_buffers : nullptr},
                      [&](int64_t, C* p, const C* g, C* sq, C* ga, C* buf, int64_t n) {
                        block(p, g, sq, ga, buf, n, c, x);
                      });
  });
}

}  // namespace dlk::cpu

// Batch norm's per-channel constants, computed in double once per call: the parameters as the
// kernels see them and the folded scale, shift and backward coefficients of each channel.
#include <ATen/Dispatch.h>

#include <vector>

#include "batch_norm_impl.h"

namespace dlk::cpu {
namespace {

// A parameter as the kernels see it (converted to the compute type), or `fill` where absent.
std::vector<double> param_values(const std::optional<at::Tensor>& t, const at::Tensor& x, double fill) {
  const bool as_float = acc_type(x) == at::kFloat;
  if (!t) return std::vector<double>(x.size(1), as_float ? double(float(fill)) : fill);
  return doubles(*t, x.size(1), as_float);
}

// Constants of channel c from its mean and invstd. grad_input = k1 * dz + ka * (x - mean) + kc folds the
// batch-statistics terms of the sums (sum dz, sum dz * xhat over `count` elements), when given.
RowK<double> channel_k(const ChannelParams& p, int64_t c, double mean, double invstd,
                       const double* sum_dz = nullptr, const double* sum_dz_xhat = nullptr, double count = 1) {
  RowK<double> k{};
  k.scale = p.w[c] * invstd;
  // The shift is folded in the compute type from the scale and mean as the kernels see them
  // (rounded), as torch's CPU kernel does: x == mean then gives exactly the bias, not a rounding
  // residue of a double fold that an activation's gradient would see as positive or negative.
  if (p.as_float) {
    const float sf = float(k.scale);
    k.shift = double(float(p.b[c]) - float(mean) * sf);
  } else {
    k.shift = p.b[c] - mean * k.scale;
  }
  k.slope = p.slope[c];
  k.mean = mean;
  k.invstd = invstd;
  k.k1 = k.scale;
  if (sum_dz != nullptr) {
    const double k2 = k.scale * *sum_dz / count, k3 = k.scale * *sum_dz_xhat / count;
    k.ka = -k3 * invstd;
    k.kc = -k2;
  }
  return k;
}

}  // namespace

std::vector<double> doubles(const at::Tensor& t, int64_t c, bool as_float) {
  const at::Tensor tc = t.contiguous();
  std::vector<double> out(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "dlkernels batch_norm", [&] {
    const scalar_t* v = tc.const_data_ptr<scalar_t>();
    const bool one = tc.numel() == 1;
    for (int64_t i = 0; i < c; ++i) {
      const double d = double(v[one ? 0 : i]);
      out[i] = as_float ? double(float(d)) : d;
    }
  });
  return out;
}
std::vector<double> doubles(const at::Tensor& t) { return doubles(t, t.numel()); }

ChannelParams channel_params(const at::Tensor& x, const std::optional<at::Tensor>& w,
                             const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
                             int64_t act, double slope) {
  ChannelParams p{param_values(w, x, 1.0), param_values(b, x, 0.0), {}, acc_type(x) == at::kFloat};
  p.slope = act == kActPrelu ? param_values(prelu_w, x, 0.0)
                             : std::vector<double>(x.size(1), act == kActLeakyRelu ? slope : 0.0);
  return p;
}

Ks make_consts(const ChannelParams& p, const std::vector<double>& mean, const std::vector<double>& invstd,
               const double* sum_dz, const double* sum_dz_xhat, double count) {
  Ks ks(mean.size());
  for (size_t c = 0; c < ks.size(); ++c)
    ks[c] = sum_dz ? channel_k(p, c, mean[c], invstd[c], sum_dz + c, sum_dz_xhat + c, count)
                   : channel_k(p, c, mean[c], invstd[c]);
  return ks;
}

}  // namespace dlk::cpu

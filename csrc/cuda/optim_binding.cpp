// Tensor checks, the tensor table (built on the host, uploaded once per call) and stream lookup
// for the CUDA optimizer kernels.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstring>
#include <map>
#include <vector>

#include "../api/optim.h"
#include "../common/optim.h"
#include "binding.h"
#include "optim.cuh"

namespace dlk::cuda {
namespace {

// The table on the device (kept alive by the returned tensor) and the total number of chunks.
std::pair<at::Tensor, int64_t> upload(std::vector<OptimTensor>& rows, const at::Device& device) {
  int64_t chunks = 0;
  for (auto& r : rows) {
    r.first_chunk = chunks;
    chunks += (r.n + kOptimChunk - 1) / kOptimChunk;
  }
  const int64_t bytes = int64_t(rows.size() * sizeof(OptimTensor));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), rows.data(), bytes);
  // Pinned + non_blocking: the copy is ordered on the stream; the caching host allocator keeps
  // `host` alive until the copy has run.
  return {host.to(device, /*non_blocking=*/true), chunks};
}

// A one-element scalar as float32 on `device` (converted on the stream when it is not: e.g. the
// float64 clip coefficient of float64 gradients); `keep` holds the converted copy alive.
const float* scalar_ptr(const std::optional<at::Tensor>& t, const at::Device& device, const char* name,
                        std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1, "dlkernels cuda optim: ", name, " must have one element");
  keep.push_back(t->to(device, at::kFloat).contiguous());
  return keep.back().const_data_ptr<float>();
}

void check_group(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& params,
                 const char* name, bool same_dtype_as_first) {
  TORCH_CHECK(ts.size() == params.size(), "dlkernels optim: ", name, " has ", ts.size(),
              " tensors, expected ", params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device() == params[0].device(), "dlkernels cuda optim: ", name, "[", i,
                "] is on ", ts[i].device(), ", expected ", params[0].device());
    TORCH_CHECK(ts[i].numel() == params[i].numel() &&
                    (ts[i].numel() <= 1 || ts[i].strides() == params[i].strides()),
                "dlkernels optim: ", name, "[", i, "] must match params[", i, "] in size and strides");
    TORCH_CHECK(!same_dtype_as_first || ts[i].scalar_type() == ts[0].scalar_type(),
                "dlkernels optim: every tensor of ", name, " must have the same dtype");
  }
}

std::vector<OptimTensor> rows_for(const std::vector<at::Tensor>& params,
                                  const std::vector<at::Tensor>& grads,
                                  const std::vector<at::Tensor>& s0,
                                  const std::vector<at::Tensor>& s1,
                                  const std::vector<at::Tensor>& s2,
                                  const std::vector<at::Tensor>& steps) {
  std::vector<OptimTensor> rows;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(steps[i].device() == params[i].device() && steps[i].scalar_type() == at::kFloat &&
                    steps[i].numel() == 1,
                "dlkernels cuda optim: each step must be a float32 tensor on the parameter's device");
    rows.push_back({params[i].mutable_data_ptr(), grads[i].const_data_ptr(), s0[i].mutable_data_ptr(),
                    s1.empty() ? nullptr : s1[i].mutable_data_ptr(),
                    s2.empty() ? nullptr : s2[i].mutable_data_ptr(), steps[i].mutable_data_ptr<float>(),
                    params[i].numel(), 0});
  }
  return rows;
}

}  // namespace

at::Tensor grad_norm(const std::vector<at::Tensor>& grads, double norm_type, double clip_value,
                     const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!grads.empty() && grads[0].is_cuda(), "dlkernels cuda grad_norm: CUDA gradients expected");
  TORCH_CHECK(norm_type > 0, "dlkernels grad_norm: norm_type must be > 0 or inf, got ", norm_type);
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int kind = norm_type == 2.0 ? 0 : norm_type == 1.0 ? 1 : std::isinf(norm_type) ? 2 : 3;
  std::map<int, std::vector<OptimTensor>> by_dtype;  // one launch per dtype
  bool all_double = true;
  for (const auto& g : grads) {
    TORCH_CHECK(g.device() == device && g.is_non_overlapping_and_dense(),
                "dlkernels cuda grad_norm: gradients must be dense and on ", device);
    all_double &= g.scalar_type() == at::kDouble;
    by_dtype[int(dtype_of(g))].push_back(
        {const_cast<void*>(g.const_data_ptr()), nullptr, nullptr, nullptr, nullptr, nullptr, g.numel(), 0});
  }
  std::vector<at::Tensor> keep;
  const float* scale = scalar_ptr(grad_scale, device, "grad_scale", keep);
  std::vector<std::pair<at::Tensor, int64_t>> tables;
  int64_t total = 0;
  for (auto& [dtype, rows] : by_dtype) {
    tables.push_back(upload(rows, device));
    total += tables.back().second;
  }
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1)}, grads[0].options().dtype(at::kDouble));
  int64_t offset = 0;
  size_t k = 0;
  for (auto& [dtype, rows] : by_dtype) {
    const auto& [table, chunks] = tables[k++];
    launch_norm_partials(DType(dtype), reinterpret_cast<const OptimTensor*>(table.const_data_ptr()),
                         int(rows.size()), chunks, kind, norm_type, clip_value, scale,
                         partials.mutable_data_ptr<double>() + offset, stream());
    offset += chunks;
  }
  at::Tensor out = at::empty({}, grads[0].options().dtype(all_double ? at::kDouble : at::kFloat));
  launch_norm_finish(partials.const_data_ptr<double>(), total, kind, norm_type, out.mutable_data_ptr(),
                     all_double, stream());
  check_launch();
  return out;
}

void adam_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                const std::vector<at::Tensor>& grads, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& skip,
                double clip_value, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "dlkernels cuda backend: params must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);
  check_group(params, params, "params", true);
  check_group(grads, params, "grads", true);
  check_group(exp_avgs, params, "exp_avgs", true);
  check_group(exp_avg_sqs, params, "exp_avg_sqs", true);
  if (amsgrad) check_group(max_exp_avg_sqs, params, "max_exp_avg_sqs", true);
  TORCH_CHECK(steps.size() == params.size(), "dlkernels optim: one step per param expected");
  auto rows = rows_for(params, grads, exp_avgs, exp_avg_sqs,
                       amsgrad ? max_exp_avg_sqs : std::vector<at::Tensor>{}, steps);
  auto [table, chunks] = upload(rows, device);
  const AdamArgs a{lr, beta1, beta2, eps, weight_decay, clip_value,
                   weight_decay == 0 ? kNoDecay : decoupled_weight_decay ? kDecoupled : kL2, amsgrad, maximize};
  std::vector<at::Tensor> keep;
  const DeviceScalars s{scalar_ptr(grad_scale, device, "grad_scale", keep),
                        scalar_ptr(clip_coef, device, "clip_coef", keep), scalar_ptr(skip, device, "skip", keep)};
  launch_adam(dtype_of(params[0]), dtype_of(exp_avgs[0]),
              reinterpret_cast<const OptimTensor*>(table.const_data_ptr()), int(rows.size()), chunks, a,
              s, stream());
  check_launch();
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
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "dlkernels cuda backend: params must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);
  check_group(params, params, "params", true);
  check_group(grads, params, "grads", true);
  check_group(square_avgs, params, "square_avgs", true);
  if (centered) check_group(grad_avgs, params, "grad_avgs", true);
  if (momentum > 0) check_group(momentum_buffers, params, "momentum_buffers", true);
  TORCH_CHECK(steps.size() == params.size(), "dlkernels optim: one step per param expected");
  auto rows = rows_for(params, grads, square_avgs, centered ? grad_avgs : std::vector<at::Tensor>{},
                       momentum > 0 ? momentum_buffers : std::vector<at::Tensor>{}, steps);
  auto [table, chunks] = upload(rows, device);
  const RMSpropArgs a{lr, alpha, eps, weight_decay, momentum, clip_value, centered, maximize};
  std::vector<at::Tensor> keep;
  const DeviceScalars s{scalar_ptr(grad_scale, device, "grad_scale", keep),
                        scalar_ptr(clip_coef, device, "clip_coef", keep), scalar_ptr(skip, device, "skip", keep)};
  launch_rmsprop(dtype_of(params[0]), dtype_of(square_avgs[0]),
                 reinterpret_cast<const OptimTensor*>(table.const_data_ptr()), int(rows.size()), chunks,
                 a, s, stream());
  check_launch();
}

}  // namespace dlk::cuda

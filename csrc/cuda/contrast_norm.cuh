// Raw launchers of the CUDA contrast normalization kernels: pointers, sizes and a stream, no torch
// headers. GCN: x is (n, m) in memory (example i = the dense block [i * m, (i + 1) * m)).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace dlk::cuda {

// stats: [n, 4] (a, inv, w, b) of float (double for f64); part: [n, split, 3] of the same type.
void launch_gcn_forward(DType t, const void* x, void* y, void* stats, void* part, int64_t n, int64_t m,
                        int split, int style, double scale, double lam, double eps, bool subtract_mean,
                        cudaStream_t s);
// part: [n, split, 2] of the stats type.
void launch_gcn_backward(DType t, const void* g, const void* x, const void* stats, void* gi, void* part,
                         int64_t n, int64_t m, int split, bool subtract_mean, cudaStream_t s);

// LCN: one call's shapes, windows and statistics buffers (device pointers; windows, 1/z,
// shift and buffers in the compute type: float, or double for f64). x is read through its
// strides (elements, NCHW order), as are grad_output and the outputs.
struct LcnCall {
  int64_t n, c, h, w, cs;  // cs: statistics planes per example (C, or 1 across channels)
  int64_t rw, rh;          // radii of the (clipped) windows ww (along W) and wh (along H)
  bool across, lecun;
  double eps;
  int64_t xs[4];
  const void *ww, *wh, *izc, *izr, *shift;  // shift: the first value of each statistics plane
  void *t, *m, *s, *cm;                     // [n cs, h, w] x3, [n cs] (lecun's plane means of s)
};

void launch_lcn_forward(DType t, const LcnCall& a, const void* x, void* y, const int64_t* ys, cudaStream_t s);
// gsb, ct: [n cs, h, w]; gc: [n cs]; gv: [n, c, h, w], all of the compute type.
void launch_lcn_backward(DType t, const LcnCall& a, const void* g, const int64_t* gs, const void* x, void* gi,
                         const int64_t* os, void* gsb, void* ct, void* gc, void* gv, cudaStream_t s);

}  // namespace dlk::cuda

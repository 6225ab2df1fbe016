"""GPU runtime tests: the cuda and triton backends on CUDA tensors against torch. They run only
where a CUDA device is visible and skip elsewhere (numerics of the shared per-element math are
covered by the CPU tests; Triton kernels by the interpreter tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import DTYPES, assert_close_like_torch

import dlkernels
import dlkernels.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_activation_on_gpu(backend, dtype, layout):
    x = torch.randn(4, 33, 17, 9, device="cuda", dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    x = x.to(dtype).requires_grad_()
    w = torch.rand(33, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(x.shape, device="cuda", dtype=dtype)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    with dlkernels.use_backend(backend):
        ours = [F.leaky_relu(x, 0.1), F.prelu(x, w)]
        ours_g = torch.autograd.grad(ours, (x, w), (g, g))
    theirs = [TF.leaky_relu(x, 0.1), TF.prelu(x, w)]
    theirs_g = torch.autograd.grad(theirs, (x, w), (g, g))
    exact = [TF.leaky_relu(x64, 0.1), TF.prelu(x64, w64)]
    exact_g = torch.autograd.grad(exact, (x64, w64), (g.double(), g.double()))
    for a, b, c in zip(ours + list(ours_g[:1]), theirs + list(theirs_g[:1]), exact + list(exact_g[:1]), strict=True):
        assert_close_like_torch(a, b, c)
    torch.testing.assert_close(ours_g[1].double(), exact_g[1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "prelu"])
def test_batch_norm_on_gpu(backend, dtype, layout, act):
    """BatchNormAct2d on CUDA tensors against torch's BatchNorm2d + activation: training output,
    every gradient and the running statistics, then eval."""
    x = torch.randn(6, 33, 7, 9, device="cuda", dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    g = torch.randn(x.shape, device="cuda", dtype=dtype)
    ours = dlkernels.nn.BatchNormAct2d(33, activation=act, negative_slope=0.2, prelu_parameters=33).cuda()
    bn = torch.nn.BatchNorm2d(33).cuda()
    extra = {None: [], "relu": [torch.nn.ReLU()], "leaky_relu": [torch.nn.LeakyReLU(0.2)],
             "prelu": [torch.nn.PReLU(33)]}[act]
    theirs = torch.nn.Sequential(bn, *extra).cuda()
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours.to(param_dtype), theirs.to(param_dtype)
    if act == "prelu":
        theirs[1].to(dtype)
        ours.prelu_weight.data = ours.prelu_weight.data.to(dtype)
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        with dlkernels.use_backend(backend):
            yo = ours(xo)
            go = torch.autograd.grad(yo, [xo, ours.weight, ours.bias], g)
        yt = theirs(xt)
        gt = torch.autograd.grad(yt, [xt, bn.weight, bn.bias], g)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(yo, yt, **tol)
        for a, b in zip(go, gt, strict=True):
            torch.testing.assert_close(a.to(b.dtype), b, **tol)
        torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-4, atol=1e-5)

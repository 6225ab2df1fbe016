"""`python -m dlkernels`: versions, backends (and why not), CPU SIMD path, and a quick
self-check of every usable backend against the reference implementation."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

import torch

import dlkernels
from dlkernels import _backend
from dlkernels import functional as F


def _activation_check(device: torch.device) -> float:
    """Max abs difference to the reference over leaky ReLU / PReLU forward and backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=gen).to(device)
    w = torch.rand(5, generator=gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[torch.Tensor]:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y1 = F.leaky_relu(xr, 0.1)
        y2 = F.prelu(xr.to(memory_format=torch.channels_last), wr)
        return [y1, y2, *torch.autograd.grad((y1, y2), (xr, wr), (g, g))]

    got = run()
    with dlkernels.use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


def _batch_norm_check(device: torch.device) -> float:
    """Max abs difference to the reference over fused BN + PReLU, training and eval, with gradients."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, 3, generator=gen) * 2 + 1).to(device)
    w, b, p = (torch.rand(6, generator=gen).to(device) for _ in range(3))
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[torch.Tensor]:
        out = []
        for training, xi in ((True, x), (False, x.to(memory_format=torch.channels_last))):
            xr, wr, br, pr = (t.clone().requires_grad_() for t in (xi, w, b, p))
            rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
            y = F.batch_norm_act(xr, rm, rv, wr, br, training, activation="prelu", prelu_weight=pr)
            out += [y, rm, rv, *torch.autograd.grad(y, (xr, wr, br, pr), g)]
        return out

    got = run()
    with dlkernels.use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


def _optim_check(device: torch.device) -> float:
    """Max abs difference to the reference over 3 clipped FusedAdamW and FusedRMSprop steps."""
    from dlkernels.optim import FusedAdamW, FusedRMSprop

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in ((37,), (5, 7))]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(3)]

    def run() -> list[torch.Tensor]:
        out = []
        for cls, kw in ((FusedAdamW, {"amsgrad": True}), (FusedRMSprop, {"momentum": 0.9, "centered": True})):
            ps = [torch.nn.Parameter(p.to(device)) for p in init]
            opt = cls(ps, lr=0.01, max_grad_norm=1.0, **kw)
            for gs in grads:
                for p, g in zip(ps, gs, strict=True):
                    p.grad = g.to(device)
                opt.step()
            out += [p.detach() for p in ps]
        return out

    got = run()
    with dlkernels.use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


# family -> check(device) returning the max error; later families add theirs here.
SELF_CHECKS: dict[str, Callable[[torch.device], float]] = {
    "activation": _activation_check,
    "batch_norm": _batch_norm_check,
    "optim": _optim_check,
}
TOLERANCE = 1e-4


def main() -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"dlkernels {dlkernels.__version__}  torch {torch.__version__} (CUDA build: {torch.version.cuda})"
          f"  triton {triton_version}  python {platform.python_version()}")
    if _backend._C is not None:
        info = _backend._C.build_info
        print(f"extension: {_backend._C.__file__}\n  CUDA kernels: {info['cuda']}"
              f" (arch list {info['cuda_arch_list'] or '-'}), OpenMP: {info['openmp']},"
              f" CPU SIMD path: {_backend._C.cpu.capability()} (this CPU: {_backend._C.cpu.native_capability()};"
              f" DLK_CPU_CAPABILITY={os.environ.get('DLK_CPU_CAPABILITY', 'unset')}),"
              f" threads: {torch.get_num_threads()}")
    print("backends:")
    status = dlkernels.available_backends()
    for name in dlkernels.BACKENDS:
        ok, why = status[name]
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {why}")
    print("self-check against the reference:")
    failed = False
    for name in dlkernels.BACKENDS:
        if name == "reference" or not status[name][0]:
            continue
        device = torch.device("cpu" if name == "cpu" or not torch.cuda.is_available() else "cuda")
        for family, check in SELF_CHECKS.items():
            with dlkernels.use_backend(name):
                try:
                    err = check(device)
                    ok = err <= TOLERANCE
                    detail = f"max abs error {err:.2e}"
                except dlkernels.BackendUnavailableError as e:  # a family this backend lacks
                    print(f"  {name:10s} {family:12s} {'n/a':7s} {e}")
                    continue
                except Exception as e:  # report every backend, then fail
                    ok, detail = False, f"{type(e).__name__}: {e}"
            failed |= not ok
            print(f"  {name:10s} {family:12s} {'ok' if ok else 'FAILED':7s} {detail} ({device.type})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

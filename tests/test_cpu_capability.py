"""The CPU kernels at each SIMD level this CPU runs below its best (the best level is what the
rest of the test run uses), each in a subprocess under DLK_CPU_CAPABILITY=<level>, which the
extension reads when it loads: the numerical tests of every family pass there, and every level
gives the same bits as the best one (no FMA contraction: see setup.py), as do the streaming
stores of outputs larger than the L3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlkernels import _backend
from dlkernels.ops import FAMILIES

HERE = Path(__file__).resolve().parent
# The backend-parametrized comparisons with torch and the reference (ids carry "cpu"), plus the
# build test, which checks that the forced level is the one in use.
FILES = [f"test_{family}.py" for family in FAMILIES if (HERE / f"test_{family}.py").exists()] + [
    "test_batch_norm_dropout.py", "test_build.py"]
SELECT = "cpu and not compile"


def _lower_levels() -> list:
    if _backend._C is None:
        return [pytest.param("default", marks=pytest.mark.skip(reason="dlkernels._C is not built"))]
    levels = _backend.CPU_CAPABILITIES
    native = levels.index(_backend._C.cpu.native_capability())
    lower = list(levels[:native])
    return lower or [pytest.param("none", marks=pytest.mark.skip(reason="this CPU runs only the default level"))]


# Every CPU kernel of every family on seeded inputs (odd sizes, each memory path and dtype).
OUTPUTS_SCRIPT = r"""
import sys, torch, dlkernels, dlkernels.functional as F
from dlkernels import optim
g = torch.Generator().manual_seed(0)
out = {}
def run(name, fn, *xs, grads=True):
    xs = [x.detach().requires_grad_(grads and x.is_floating_point()) for x in xs]
    with dlkernels.use_backend("cpu"):
        y = fn(*xs)
        out[name] = y.detach()
        if grads:
            gy = torch.randn(y.shape, generator=g).to(y.dtype)
            gs = torch.autograd.grad(y, [x for x in xs if x.requires_grad], gy, allow_unused=True)
            gs = [t for t in gs if t is not None]
            out.update({f"{name}/grad{i}": t for i, t in enumerate(gs)})
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    x = torch.randn(3, 37, 5, 7, generator=g).to(dt)
    w = torch.rand(37, generator=g).to(dt)
    run(f"leaky {dt}", lambda x: F.leaky_relu(x, -0.3), x)
    run(f"prelu {dt}", F.prelu, x, w)
    run(f"prelu CL {dt}", F.prelu, x.to(memory_format=torch.channels_last), w)
    run(f"prelu rows {dt}", F.prelu, x[:2].reshape(2, 37, 35)[:, :5].reshape(2, 5, 5, 7).repeat(1, 1, 2, 2), w[:5])
    run(f"dropout {dt}", lambda x: F.dropout(x, 0.3, seed=5), x)
    run(f"dropout2d CL {dt}", lambda x: F.dropout2d(x, 0.5, seed=6), x.to(memory_format=torch.channels_last))
    run(f"leaky dropout {dt}", lambda x: F.leaky_relu_dropout(x, 0.1, 0.2, seed=7), x)
    run(f"prelu dropout {dt}", lambda x, w: F.prelu_dropout(x, w, 0.5, seed=8), x, w)
    for shape, cl in (((4, 3, 67, 5), False), ((5, 32, 3, 3), True), ((6, 3, 4, 4), True), ((300, 16), False)):
        xb = (torch.randn(shape, generator=g) * 2 + 3).to(dt)
        xb = xb.to(memory_format=torch.channels_last) if cl else xb
        c, pdt = shape[1], torch.float64 if dt == torch.float64 else torch.float32
        wb, bb = (torch.rand(c, generator=g) + 0.5).to(pdt), torch.randn(c, generator=g).to(pdt)
        for act in (None, "relu", "leaky_relu", "prelu"):
            p = torch.full((c,), 0.2, dtype=pdt)
            run(f"bn {shape} {cl} {act} {dt}", lambda x, w, b, p, act=act: F.batch_norm_act(
                x, None, None, w, b, training=True, activation=act, negative_slope=0.1, prelu_weight=p), xb, wb, bb, p)
            rm, rv = torch.randn(c, generator=g).to(pdt), torch.rand(c, generator=g).to(pdt) + 0.5
            run(f"bn eval {shape} {cl} {act} {dt}", lambda x, w, b, p, act=act, rm=rm, rv=rv: F.batch_norm_act(
                x, rm, rv, w, b, training=False, activation=act, prelu_weight=p), xb, wb, bb, p)
            run(f"bn dropout {shape} {cl} {act} {dt}", lambda x, w, b, p, act=act: F.batch_norm_act(
                x, None, None, w, b, training=True, activation=act, negative_slope=0.1, prelu_weight=p,
                dropout=0.3, seed=11), xb, wb, bb, p)
for cls, kw in ((optim.FusedAdamW, dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)),
                (optim.FusedRMSprop, dict(lr=1e-2, momentum=0.9, centered=True, clip_value=0.3))):
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1, 37, 1000)]
    opt = cls(ps, **kw)
    for _ in range(3):
        for q in ps:
            q.grad = torch.randn(q.shape, generator=g)
        opt.step()
    out.update({f"{cls.__name__} {i}": q.detach().clone() for i, q in enumerate(ps)})
    out[f"{cls.__name__} state"] = torch.cat([t.flatten() for s in opt.state.values() for t in s.values()
                                              if torch.is_tensor(t) and t.is_floating_point()])
torch.save(out, sys.argv[1])
"""


def _outputs(level: str | None, path: Path, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DLK_CPU_CAPABILITY", "DLK_STREAM_BYTES")}
    if level is not None:
        env["DLK_CPU_CAPABILITY"] = level
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-c", OUTPUTS_SCRIPT, str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@pytest.fixture(scope="module")
def best_outputs(tmp_path_factory) -> dict:
    if _backend._C is None:
        pytest.skip("dlkernels._C is not built")
    return _outputs(None, tmp_path_factory.mktemp("best") / "best.pt")


def _assert_same_bits(best: dict, ours: dict, what: str) -> None:
    assert best.keys() == ours.keys()
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (NaNs compare too)
    differ = [k for k in best if not torch.equal(bits(best[k]), bits(ours[k]))]
    assert not differ, f"{what}: {len(differ)} of {len(best)} outputs differ from the best level's: {differ[:10]}"


@pytest.mark.parametrize("level", _lower_levels())
def test_every_level_gives_the_same_bits(level, best_outputs, tmp_path):
    _assert_same_bits(best_outputs, _outputs(level, tmp_path / f"{level}.pt"), f"DLK_CPU_CAPABILITY={level}")


def test_streaming_stores_give_the_same_bits(best_outputs, tmp_path):
    """Outputs larger than the L3 are written with streaming stores (loadstore.h), which inputs of
    test size never reach; DLK_STREAM_BYTES=0 streams every float/double output (odd sizes, so the
    unaligned heads and tails too)."""
    ours = _outputs(None, tmp_path / "stream.pt", DLK_STREAM_BYTES="0")
    _assert_same_bits(best_outputs, ours, "DLK_STREAM_BYTES=0")


@pytest.mark.parametrize("level", _lower_levels())
def test_cpu_kernels_at_level(level):
    env = dict(os.environ, DLK_CPU_CAPABILITY=level)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES, "-k", SELECT]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    print(f"\nDLK_CPU_CAPABILITY={level}: {tail.splitlines()[-1] if tail else ''}")
    assert proc.returncode == 0, f"CPU tests at DLK_CPU_CAPABILITY={level} failed:\n{tail}"

"""FusedAdam, FusedAdamW and FusedRMSprop against torch.optim over many steps, on the cpu and
reference backends (cuda where a GPU exists): every argument combination, dtypes, clipping,
non-finite gradients, state_dict compatibility, checkpoint/resume, GradScaler, lr schedulers,
bad input and opcheck of the custom ops."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from conftest import assert_close_like_torch, backend_params

import dlkernels
from dlkernels.ops import optim as ops
from dlkernels.optim import FusedAdam, FusedAdamW, FusedRMSprop

BACKENDS = [p for p in backend_params("cpu") if p.id in ("cpu", "reference")]
# Odd sizes (SIMD tails), a 4-d channels_last tensor, one element, and > 1 chunk of work.
SHAPES = [(7,), (13, 17), (3, 5, 2, 2), (1,), (40000,)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
TORCH = {FusedAdam: torch.optim.Adam, FusedAdamW: torch.optim.AdamW, FusedRMSprop: torch.optim.RMSprop}
STEPS = 20


def make_params(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ps[2] = ps[2].contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(p.to(device=device, dtype=dtype)) for p in ps]


def grads_for(params: list[torch.Tensor], step: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.device, p.dtype)
            .contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            for p in params]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor], skip_last: bool = False) -> None:
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.grad = None if (skip_last and i == len(params) - 1) else g.clone()


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = STEPS, first: int = 0,
          clip: tuple | None = None, scale: float = 1.0) -> None:
    """`steps` steps with the same gradients on every run; param 0 gets no gradient on odd steps."""
    for k in range(first, first + steps):
        set_grads(params, grads_for(params, k, scale))
        if k % 2:
            params[0].grad = None
        if clip is not None:  # torch's way: clip the gradients, then step
            value, norm, norm_type = clip
            if value is not None:
                torch.nn.utils.clip_grad_value_(params, value)
            if norm is not None:
                torch.nn.utils.clip_grad_norm_(params, norm, norm_type)
        opt.step()


def assert_params_close(ours, theirs, dtype) -> None:
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[dtype])


def compare(cls, kwargs: dict, backend: str, dtype: torch.dtype, ours_extra: dict | None = None,
            clip: tuple | None = None, steps: int = STEPS) -> tuple:
    ps, qs = make_params(dtype), make_params(dtype)
    ours = cls(ps, **kwargs, **(ours_extra or {}))
    theirs = TORCH[cls](qs, **kwargs, foreach=False)
    with dlkernels.use_backend(backend):
        train(ours, ps, steps)
    train(theirs, qs, steps, clip=clip)
    # torch divides a tensor lr by the bias correction in the lr's (float32) precision; we use double.
    tol = TOL[torch.float32] if isinstance(kwargs.get("lr"), torch.Tensor) else TOL[dtype]
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
        for key, value in theirs.state[q].items():  # near-zero sums (momentum) lose relative digits
            atol = tol["atol"] + tol["rtol"] * value.abs().max().item()
            torch.testing.assert_close(ours.state[p][key], value, rtol=tol["rtol"], atol=atol)
    return ours, theirs, ps, qs


ADAM_CASES = [
    {}, {"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.05, "amsgrad": True},
    {"betas": (0.3, 0.9), "lr": 0.05}, {"lr": torch.tensor(0.01)}, {"eps": 1e-3, "betas": (0.0, 0.5)},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs", ADAM_CASES + [{"decoupled_weight_decay": True, "weight_decay": 0.1}], ids=str)
def test_adam_matches_torch(backend, dtype, cls, kwargs):
    if cls is FusedAdamW and "decoupled_weight_decay" in kwargs:
        pytest.skip("AdamW has no decoupled_weight_decay argument")
    compare(cls, kwargs, backend, dtype)


RMSPROP_CASES = [
    {}, {"momentum": 0.9}, {"centered": True}, {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
    {"maximize": True, "momentum": 0.3}, {"alpha": 0.3, "centered": True, "lr": 0.001},
    {"lr": torch.tensor(0.005), "eps": 1e-4},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kwargs", RMSPROP_CASES, ids=str)
def test_rmsprop_matches_torch(backend, dtype, kwargs):
    compare(FusedRMSprop, kwargs, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdam, FusedRMSprop], ids=lambda c: c.__name__)
def test_param_groups_and_scheduler(backend, cls):
    ps, qs = make_params(torch.float32), make_params(torch.float32)
    extra = {"momentum": 0.9} if cls is FusedRMSprop else {"amsgrad": True}

    def groups(params):
        return [{"params": params[:2], "lr": 0.02, "weight_decay": 0.1}, {"params": params[2:], **extra}]

    ours, theirs = cls(groups(ps), lr=0.01), TORCH[cls](groups(qs), lr=0.01, foreach=False)
    no_foreach = [{k: v for k, v in g.items() if k != "foreach"} for g in theirs.state_dict()["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "foreach"} for g in ours.state_dict()["param_groups"]] == no_foreach
    s_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    s_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    for k in range(10):
        with dlkernels.use_backend(backend):
            train(ours, ps, 1, first=k)
        train(theirs, qs, 1, first=k)
        s_ours.step()
        s_theirs.step()
    assert_params_close(ps, qs, torch.float32)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdamW, FusedRMSprop], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, None], ids=["f32state", "samestate"])
def test_low_precision_against_float32(backend, cls, dtype, state_dtype):
    """Error against a float32 run no worse than torch's own run in that dtype."""
    kwargs = {"lr": 0.01, "momentum": 0.9} if cls is FusedRMSprop else {"lr": 0.01}
    ps, qs, refs = make_params(dtype), make_params(dtype), make_params(torch.float32)
    for r, p in zip(refs, ps, strict=True):
        r.data.copy_(p.data.float())
    ours = cls(ps, **kwargs, state_dtype=state_dtype)
    with dlkernels.use_backend(backend):
        train(ours, ps)
    train(TORCH[cls](qs, **kwargs, foreach=False), qs)
    train(TORCH[cls](refs, **kwargs, foreach=False), refs)
    for p, q, r in zip(ps, qs, refs, strict=True):
        assert_close_like_torch(p.detach(), q.detach(), r.detach())
    want = dtype if state_dtype is None else torch.float32
    assert all(s[k].dtype == want for s in ours.state.values() for k in s if k != "step")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdam, FusedRMSprop], ids=lambda c: c.__name__)
@pytest.mark.parametrize("clip", [(None, 1.0, 2.0), (None, 0.5, float("inf")), (None, 2.0, 1.0),
                                  (0.3, None, 2.0), (0.5, 1.0, 3.0)], ids=str)
def test_clipping_equals_torch_clip_then_step(backend, cls, clip):
    value, norm, norm_type = clip
    kwargs = {"lr": 0.01}
    ps, qs = make_params(torch.float32), make_params(torch.float32)
    ours = cls(ps, **kwargs, max_grad_norm=norm, norm_type=norm_type, clip_value=value)
    theirs = TORCH[cls](qs, **kwargs, foreach=False)
    for k in range(STEPS):
        with dlkernels.use_backend(backend):
            train(ours, ps, 1, first=k, scale=3.0)
        raw = [p.grad.clone() if p.grad is not None else None for p in ps]
        assert all(g is None or torch.equal(g, p.grad) for g, p in zip(raw, ps, strict=True))  # untouched
        with_grad = [q for q, p in zip(qs, ps, strict=True) if p.grad is not None]
        set_grads(qs, grads_for(qs, k, 3.0))
        if k % 2:
            qs[0].grad = None
        if value is not None:
            torch.nn.utils.clip_grad_value_(with_grad, value)
        if norm is not None:
            total = torch.nn.utils.clip_grad_norm_(with_grad, norm, norm_type)
            torch.testing.assert_close(ours.grad_norm, total, rtol=1e-5, atol=1e-6)
        theirs.step()
    assert_params_close(ps, qs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdam, FusedRMSprop], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_skip_loses_nothing(backend, cls, bad):
    kwargs = {"lr": 0.01, "momentum": 0.5} if cls is FusedRMSprop else {"lr": 0.01, "amsgrad": True}
    ps, qs = make_params(torch.float32), make_params(torch.float32)
    ours, theirs = cls(ps, **kwargs, max_grad_norm=1.0), TORCH[cls](qs, **kwargs, foreach=False)
    with dlkernels.use_backend(backend):
        train(ours, ps, 3)
        before = [p.detach().clone() for p in ps], copy.deepcopy(ours.state_dict())
        set_grads(ps, grads_for(ps, 99))
        ps[1].grad[3, 4] = bad
        ours.step()
        assert not torch.isfinite(ours.grad_norm)
        for p, b in zip(ps, before[0], strict=True):
            assert torch.equal(p, b)
        after = ours.state_dict()["state"]
        for k, st in before[1]["state"].items():
            for key, v in st.items():
                assert torch.equal(after[k][key], v), key
        train(ours, ps, 3, first=3)
    train(theirs, qs, 6, clip=(None, 1.0, 2.0))
    assert_params_close(ps, qs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_error_and_propagate(backend):
    ps = make_params(torch.float32)
    with dlkernels.use_backend(backend):
        opt = FusedAdam(ps, on_nonfinite="error", max_grad_norm=1.0)
        set_grads(ps, grads_for(ps, 0))
        ps[0].grad[0] = float("nan")
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step()
        opt = FusedAdam(ps, on_nonfinite="propagate")
        set_grads(ps, grads_for(ps, 0))
        ps[0].grad[0] = float("inf")
        opt.step()
    assert opt.grad_norm is None  # nothing asked for the norm
    q = make_params(torch.float32)[0]
    q.grad = ps[0].grad.clone()
    torch.optim.Adam([q], foreach=False).step()
    torch.testing.assert_close(ps[0].detach(), q.detach(), equal_nan=True)
    assert ps[0].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW, FusedRMSprop], ids=lambda c: c.__name__)
def test_state_dict_both_ways_and_resume(backend, cls):
    extra = {"momentum": 0.9, "centered": True} if cls is FusedRMSprop else {"amsgrad": True}
    with dlkernels.use_backend(backend):
        ps = make_params(torch.float32)
        full = cls(ps, **extra)
        train(full, ps, 12)
        # resume: 6 steps, checkpoint, a fresh optimizer loads it, 6 more steps: bitwise equal
        rs = make_params(torch.float32)
        first = cls(rs, **extra)
        train(first, rs, 6)
        ckpt = copy.deepcopy(first.state_dict())
        params_ckpt = [r.detach().clone() for r in rs]
        rs2 = make_params(torch.float32)
        for r, c in zip(rs2, params_ckpt, strict=True):
            r.data.copy_(c)
        second = cls(rs2, **extra)
        second.load_state_dict(ckpt)
        train(second, rs2, 6, first=6)
    for a, b in zip(ps, rs2, strict=True):
        assert torch.equal(a, b)
    # ours -> torch after 6 steps; torch -> ours; both continue like an uninterrupted torch run
    qs = make_params(torch.float32)
    ref = TORCH[cls](qs, **extra, foreach=False)
    train(ref, qs, 12)
    ts = [torch.nn.Parameter(c.clone()) for c in params_ckpt]
    t_opt = TORCH[cls](ts, **extra, foreach=False)
    t_opt.load_state_dict(copy.deepcopy(ckpt))
    assert set(t_opt.state_dict()["state"][0]) == set(ckpt["state"][0])
    train(t_opt, ts, 6, first=6)
    assert_params_close(ts, qs, torch.float32)
    back = make_params(torch.float32)
    for b_, t in zip(back, ts, strict=True):
        b_.data.copy_(t.data)
    o2 = cls(back, **extra)
    o2.load_state_dict(t_opt.state_dict())
    assert o2.state[back[1]]["step"].dtype == torch.float32
    with dlkernels.use_backend(backend):
        train(o2, back, 2, first=12)
    train(ref, qs, 2, first=12)
    assert_params_close(back, qs, torch.float32)


def test_load_keeps_float32_state_of_half_params():
    ps = make_params(torch.bfloat16)
    opt = FusedAdam(ps)
    train(opt, ps, 3)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = FusedAdam(make_params(torch.bfloat16))
    opt2.load_state_dict(sd)
    for k, st in sd["state"].items():
        p = opt2.param_groups[0]["params"][k]
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], st["exp_avg"])
        assert opt2.state[p]["exp_avg"].stride() == p.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdam, FusedRMSprop], ids=lambda c: c.__name__)
def test_grad_scaler(backend, cls):
    """GradScaler hands grad_scale/found_inf to the step; overflow skips it and lowers the scale."""
    torch.manual_seed(0)
    model, ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    ours = cls(model.parameters(), lr=0.01, max_grad_norm=0.5)
    theirs = TORCH[cls](ref.parameters(), lr=0.01, foreach=False)
    s_ours, s_theirs = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(16, 8)
    for k in range(6):
        for m, opt, scaler in ((model, ours, s_ours), (ref, theirs, s_theirs)):
            opt.zero_grad()
            loss = m(x).pow(2).mean() * (float("inf") if k == 2 else 1.0)
            scaler.scale(loss).backward()
            if opt is theirs:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            with dlkernels.use_backend(backend):
                scaler.step(opt)
            scaler.update()
    assert s_ours.get_scale() == s_theirs.get_scale() < 1024.0
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state[model.weight]["step"].item() == 5


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.ones(3))

    def closure():
        p.grad = torch.full_like(p, 0.5)
        return torch.tensor(7.0)

    assert FusedAdam([p]).step(closure).item() == 7.0
    assert FusedRMSprop([p]).step(closure).item() == 7.0


def _message(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW, FusedRMSprop], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"eps": -1e-8}, {"weight_decay": -0.1}, {"betas": (1.0, 0.9)},
                                 {"betas": (0.9, -0.1)}, {"momentum": -0.5}, {"alpha": -0.1}], ids=str)
def test_invalid_arguments_like_torch(cls, bad):
    if ("betas" in bad) == (cls is FusedRMSprop) or (cls is not FusedRMSprop and {"momentum", "alpha"} & set(bad)):
        pytest.skip("not an argument of this optimizer")
    p = [torch.nn.Parameter(torch.ones(2))]
    assert _message(lambda: cls(p, **bad)) == _message(lambda: TORCH[cls](p, **bad))


@pytest.mark.parametrize("cls", [FusedAdam, FusedRMSprop], ids=lambda c: c.__name__)
def test_sparse_gradients_like_torch(cls):
    def run(c):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.ones(4).to_sparse()
        c([p]).step()

    assert _message(lambda: run(cls)) == _message(lambda: run(TORCH[cls]))


@pytest.mark.parametrize("bad", [{"max_grad_norm": 0.0}, {"max_grad_norm": -1}, {"clip_value": 0},
                                 {"on_nonfinite": "ignore"}, {"norm_type": 0.0}, {"state_dtype": torch.half}], ids=str)
def test_our_arguments_checked(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        FusedAdam([torch.nn.Parameter(torch.ones(2))], **bad)


def test_unsupported_parameters_are_named():
    p = torch.nn.Parameter(torch.ones(4, 4)[:, ::2])
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="dense"):
        FusedAdam([p]).step()
    with pytest.raises(RuntimeError, match="differentiable"):
        FusedAdam([p], differentiable=True)


def test_mixed_dtypes_in_one_group():
    """float32 and bfloat16 parameters in one group: one kernel call per (device, dtype) bucket."""
    a, b = torch.nn.Parameter(torch.randn(33)), torch.nn.Parameter(torch.randn(33).bfloat16())
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().float())
    for opt, (x, y) in ((FusedAdam([a, b], lr=0.1), (a, b)), (torch.optim.Adam([a2, b2], lr=0.1), (a2, b2))):
        for k in range(5):
            x.grad = torch.full_like(x, 0.1 * (k + 1))
            y.grad = torch.full_like(y, -0.2 * (k + 1))
            opt.step()
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b.float(), b2, rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with dlkernels.use_backend(backend):
        ps = [torch.randn(5), torch.randn(3, 4)]
        gs = [torch.randn(5), torch.randn(3, 4)]

        def state():
            return [torch.zeros_like(p) for p in ps]

        steps = [torch.zeros(()) for _ in ps]
        coef, skip, scale = torch.tensor(0.5), torch.tensor(0.0), torch.tensor(4.0)
        torch.library.opcheck(ops.grad_norm.custom, (gs, 2.0, 0.7, scale))
        torch.library.opcheck(ops.adam_step_.custom, (ps, state(), state(), state(), steps, gs, scale, coef, skip, 1.0,
                                               1e-3, 0.9, 0.999, 1e-8, 0.1, True, False, False))
        torch.library.opcheck(ops.rmsprop_step_.custom, (ps, state(), state(), state(), steps, gs, None, coef, None,
                                                  float("inf"), 1e-2, 0.99, 1e-8, 0.0, 0.9, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW, FusedRMSprop], ids=lambda c: c.__name__)
def test_cuda_matches_torch(cls):
    extra = {"momentum": 0.9, "centered": True} if cls is FusedRMSprop else {"amsgrad": True, "weight_decay": 0.1}
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(torch.float32)]
    qs = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(torch.float32)]
    ours, theirs = cls(ps, **extra, max_grad_norm=1.0), TORCH[cls](qs, **extra, foreach=False)
    train(ours, ps)
    train(theirs, qs, clip=(None, 1.0, 2.0))
    assert_params_close(ps, qs, torch.float32)


def test_triton_backend_says_it_has_no_optim_kernels():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with dlkernels.use_backend("triton"), pytest.raises(dlkernels.BackendUnavailableError):
        FusedAdam([p]).step()


def test_cuda_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Rung 3 of DESIGN.md's GPU ladder: optim.cu builds for sm_80 and sm_90, no local-memory spills.
    (The shared per-element math is what the cpu tests above run.)"""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    src = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "optim.cu"
    cmd = [nvcc, "-std=c++20", "-O3", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "optim.o"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?Used (\d+) registers", out.stderr,
                         re.DOTALL)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    assert {arch for _, arch, _ in kernels} == {"sm_80", "sm_90"}
    assert spills and all(s == ("0", "0") for s in spills), out.stderr
    print("\n" + "\n".join(f"  {arch} {regs:>3s} regs  {name[:90]}" for name, arch, regs in kernels))


@pytest.mark.parametrize("cls", ["FusedAdam", "FusedAdamW", "FusedRMSprop"])
def test_deepcopy_and_pickle_keep_the_fused_settings(cls):
    import pickle

    torch.manual_seed(zlib.crc32(cls.encode()))
    p = torch.nn.Parameter(torch.randn(5))
    opt = getattr(dlkernels.optim, cls)([p], lr=0.1, max_grad_norm=0.5, clip_value=2.0, on_nonfinite="error")
    p.grad = torch.randn(5)
    opt.step()
    want = opt.grad_norm.clone()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (other.max_grad_norm, other.clip_value, other.on_nonfinite) == (0.5, 2.0, "error")
        q = other.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        other.step()  # runs: the settings survived
        assert torch.equal(other.grad_norm, want)  # the same kernel on the same gradient

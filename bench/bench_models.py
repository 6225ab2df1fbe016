"""Whole models: one training step and eval forwards of ResNet-18 and a VGG-style net, float32, CPU.

Training step: forward, cross-entropy, backward, gradient clipping at ``MAX_GRAD_NORM`` and an
Adam step. Contenders, each with its own copy of the same initial weights and its own optimizer:

- "torch eager": the torch model, ``clip_grad_norm_`` then ``torch.optim.Adam(fused=True)``;
- "dlkernels": ``dlkernels.fuse(model)`` and ``FusedAdam(max_grad_norm=MAX_GRAD_NORM)`` (the
  clipping is inside the optimizer step);
- "torch.compile" / "dlkernels + torch.compile": the same two with ``torch.compile(model)``;
  backward runs the compiled backward graph, clipping and the optimizer step run eagerly.

Eval: forward under ``torch.no_grad()`` at batch 1 and 32, the same four contenders.

Every case also runs torch.profiler over a few steps of the torch eager model and records the
share of the step spent in the layers dlkernels replaces (``share``; per kind: ``share_batch_norm``,
``share_activation``, ``share_dropout``, ``share_optimizer``): the ceiling on what dlkernels can
change, against which the measured ratio can be judged. The rest (convolutions, linear layers,
pooling, the loss) runs torch's own kernels in every contender.

A model step has no single memory-traffic floor, so these cases have no roofline probe.
``python -m bench --only models`` runs each case under ``OMP_WAIT_POLICY`` unset and PASSIVE
(``OMP_WAIT_AUTO``; each in its own process, as the allocator settings), at the CPU's best
SIMD level only (``CPU_CAPABILITY_AUTO``: convolutions and matrix products, the bulk of a step,
are torch's and do not change with ``DLK_CPU_CAPABILITY``).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import COMPILE, DLK, DLK_COMPILE, EAGER, Case, Timing

MAX_GRAD_NORM = 1.0
LR = 1e-3
CLASSES = 10
# What `--omp-wait auto` and `--cpu-capability auto` mean for this family (see bench/__main__.py).
OMP_WAIT_AUTO = ("default", "passive")
CPU_CAPABILITY_AUTO = "native"

FULL = {"train_batch": 32, "eval_batches": (1, 32), "hw": 64}
QUICK = {"train_batch": 2, "eval_batches": (1, 2), "hw": 32}
# Steps take 0.1-1 s: a fixed number of calls instead of a minimum time.
TRAIN_TIMING = Timing(warmup=2, repeats=10, min_time=0.0, max_calls=10)
EVAL_TIMING = Timing(warmup=2, repeats=20, min_time=1.0, max_calls=200)
QUICK_TIMING = Timing(warmup=1, repeats=2, min_time=0.0, max_calls=2)
PROFILE_STEPS = 3
# --quick compiles one case only: compiling takes 10-30 s per model and pass on two cores whatever
# the input size, so compiling all six would make the smoke run minutes long.
QUICK_COMPILED = ("vgg", "train")


class VGGStyle(nn.Module):
    """A small VGG: three blocks of (Conv3x3-BN-LeakyReLU) x 2 then max-pool (widths 32/64/128;
    blocks 2 and 3 end their BN -> LeakyReLU chain with Dropout2d), then Linear-ReLU-Dropout-Linear.

    Widths are half of VGG's 64/128/256 so that a training step at batch 32 on 3x64x64 takes well
    under a second on two cores; the 64x64 first block keeps the activations large (16 MB at
    batch 32), where batch norm and activations cost the most relative to the convolutions.
    """

    def __init__(self, num_classes: int = CLASSES, widths: tuple[int, ...] = (32, 64, 128),
                 slope: float = 0.01, p_feature: float = 0.1, p_classifier: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            for j in range(2):
                layers += [nn.Conv2d(c_in if j == 0 else c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                           nn.LeakyReLU(slope)]
            if i > 0:
                layers.append(nn.Dropout2d(p_feature))
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # any input size >= 32x32 gives the same classifier
        self.classifier = nn.Sequential(nn.Linear(c_in * 16, 256), nn.ReLU(), nn.Dropout(p_classifier),
                                        nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _resnet18() -> nn.Module:
    import torchvision  # here: only this family needs it

    return torchvision.models.resnet18(num_classes=CLASSES)


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": _resnet18, "vgg": VGGStyle}


# ---------------------------------------------------------------------------------- profile

# Kinds of the layers dlkernels replaces, by op name (lower case). Backward nodes count with their
# layer (NativeBatchNormBackward0, LeakyReluBackward0, ThresholdBackward0 for ReLU). In these two
# models a multiply comes only from dropout (x * mask forward, MulBackward0 backward).
_KINDS = {
    "batch_norm": ("batch_norm", "batchnorm"),
    "activation": ("relu", "threshold"),  # relu, leaky_relu, prelu, threshold_backward
    "dropout": ("dropout", "bernoulli", "mulbackward"),
}
_OPTIM_MARK = "bench_models/clip+optimizer"
_STEP_MARK = "bench_models/step"


def _kind(name: str) -> str | None:
    if name == _OPTIM_MARK:
        return "optimizer"
    low = name.lower()
    for kind, keys in _KINDS.items():
        if any(k in low for k in keys):
            return kind
    return None


def profile_share(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Run ``step`` ``steps`` times under torch.profiler; the fraction of the step's time in each
    kind of replaced layer (``share_<kind>``) and in all of them (``share``).

    A layer's time is the inclusive CPU time of its outermost op (its forward op, its autograd
    node), so wrappers are counted once; the step's time is that of the ``_STEP_MARK`` range
    (Python between ops included). Profiling slows each op a little: these are estimates.
    """
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(_STEP_MARK):
                step()
    events = prof.events()
    total_us = sum(e.cpu_time_total for e in events if e.name == _STEP_MARK)
    by_kind = dict.fromkeys([*_KINDS, "optimizer"], 0.0)
    for e in events:
        kind = _kind(e.name)
        if kind is None:
            continue
        parent, outermost = e.cpu_parent, True
        while parent is not None:  # an enclosing op of any kind already counts this time
            if _kind(parent.name) is not None:
                outermost = False
                break
            parent = parent.cpu_parent
        if outermost:
            by_kind[kind] += e.cpu_time_total
    out = {f"share_{k}": v / total_us for k, v in by_kind.items()}
    out["share"] = sum(by_kind.values()) / total_us
    out["profiled_step_ms"] = total_us / 1e3 / steps
    return out


# ---------------------------------------------------------------------------------- cases

def _train_step(model: nn.Module, fwd: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, clip: bool, mark: bool = False) -> Callable[[], None]:
    """One training step. ``clip``: torch's clip_grad_norm_ before the step (FusedAdam clips
    inside its step). ``mark``: label clipping + step for profile_share."""
    from torch.autograd.profiler import record_function

    params = list(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        with record_function(_OPTIM_MARK) if mark else nullcontext():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
    return step


def _eval_step(fwd: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fwd(x)
    return step


def _case(model_name: str, mode: str, batch: int, hw: int, quick: bool) -> Case:
    shape = (batch, 3, hw, hw)
    name = f"{model_name} {mode} b{batch} 3x{hw}x{hw}"
    info: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        import dlkernels  # here, not at import: the package may be mid-build
        from dlkernels.optim import FusedAdam

        torch.manual_seed(zlib.crc32(name.encode()))  # same weights and data for every contender
        base = MODELS[model_name]().train(mode == "train")
        x = torch.randn(shape)
        y = torch.randint(0, CLASSES, (batch,))
        models = {EAGER: base, COMPILE: copy.deepcopy(base), DLK: dlkernels.fuse(base),
                  DLK_COMPILE: dlkernels.fuse(base)}
        if quick and (model_name, mode) != QUICK_COMPILED:
            del models[COMPILE], models[DLK_COMPILE]
        steps: dict[str, Callable[[], None]] = {}
        for k, m in models.items():
            # dynamic=False: one static-shape graph per case, as a training loop at a fixed batch
            fwd = torch.compile(m, dynamic=False) if k in (COMPILE, DLK_COMPILE) else m
            if mode != "train":
                steps[k] = _eval_step(fwd, x)
            elif k in (DLK, DLK_COMPILE):
                steps[k] = _train_step(m, fwd, FusedAdam(m.parameters(), lr=LR, max_grad_norm=MAX_GRAD_NORM), x, y,
                                       clip=False)
            else:
                steps[k] = _train_step(m, fwd, torch.optim.Adam(m.parameters(), lr=LR, fused=True), x, y, clip=True)
        # the share of torch eager's step in the replaced layers; its own optimizer, so the timed
        # eager contender's state is that of a fresh optimizer too
        prof_model = copy.deepcopy(base)
        if mode == "train":
            opt = torch.optim.Adam(prof_model.parameters(), lr=LR, fused=True)
            prof_step = _train_step(prof_model, prof_model, opt, x, y, clip=True, mark=True)
        else:
            prof_step = _eval_step(prof_model, x)
        prof_step()  # warm-up: lazy optimizer state, allocator
        info.update(profile_share(prof_step, 1 if quick else PROFILE_STEPS))
        del prof_model, prof_step
        return steps

    return Case(name=name, setup=setup, min_bytes=0, pattern=None, size_bytes=0, info=info,
                timing=QUICK_TIMING if quick else (TRAIN_TIMING if mode == "train" else EVAL_TIMING),
                rounds=2 if quick else None,
                params={"model": model_name, "pass": mode, "batch": batch, "shape": "x".join(map(str, shape)),
                        "max_grad_norm": MAX_GRAD_NORM if mode == "train" else None})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Per model: a training step at the training batch, eval forwards at each eval batch."""
    if device != "cpu":
        return []
    s = QUICK if quick else FULL
    out = []
    for model_name in MODELS:
        out.append(_case(model_name, "train", s["train_batch"], s["hw"], quick))
        out += [_case(model_name, "eval", b, s["hw"], quick) for b in s["eval_batches"]]
    return out

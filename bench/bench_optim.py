"""Fused Adam and RMSprop steps (with and without gradient clipping) against torch.optim's
for-loop (the CPU default, "torch eager"), foreach and fused implementations (each followed by
clip_grad_norm_ when clipping) and a torch.compile'd for-loop step.

Minimum bytes per float32 parameter: the update reads p, g and the state and writes p and the
state in place (Adam and RMSprop with momentum: 4 reads + 3 writes = 28 bytes); clipping adds one
read of the gradients for the norm (4 bytes). With a harness that takes several passes, the
floor is the norm pass at the read-only bandwidth plus the update at the in-place bandwidth;
otherwise all bytes count at the in-place bandwidth (a slight understatement of the fraction).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from bench.harness import COMPILE, DLK, EAGER, Case

MAX_NORM = 1.0
# torchvision.models.resnet18(): every parameter shape, in order (11,689,512 parameters).
_BN = lambda c: [(c,), (c,)]  # noqa: E731  (weight, bias)
RESNET18 = (
    [(64, 3, 7, 7)] + _BN(64)
    + 2 * ([(64, 64, 3, 3)] + _BN(64) + [(64, 64, 3, 3)] + _BN(64))
    + [(128, 64, 3, 3)] + _BN(128) + [(128, 128, 3, 3)] + _BN(128) + [(128, 64, 1, 1)] + _BN(128)
    + [(128, 128, 3, 3)] + _BN(128) + [(128, 128, 3, 3)] + _BN(128)
    + [(256, 128, 3, 3)] + _BN(256) + [(256, 256, 3, 3)] + _BN(256) + [(256, 128, 1, 1)] + _BN(256)
    + [(256, 256, 3, 3)] + _BN(256) + [(256, 256, 3, 3)] + _BN(256)
    + [(512, 256, 3, 3)] + _BN(512) + [(512, 512, 3, 3)] + _BN(512) + [(512, 256, 1, 1)] + _BN(512)
    + [(512, 512, 3, 3)] + _BN(512) + [(512, 512, 3, 3)] + _BN(512)
    + [(1000, 512), (1000,)]
)
TEN_1M = [(1_000_000,)] * 10
QUICK = [(1000,), (37, 3), (5,)]


def _params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.1) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    return ps


def _case(algo: str, clip: bool, label: str, shapes: list[tuple[int, ...]], device: str) -> Case:
    numel = sum(math.prod(s) for s in shapes)
    kwargs = {"lr": 1e-3} if algo == "adam" else {"lr": 1e-3, "momentum": 0.9}

    def setup() -> dict[str, Any]:
        from dlkernels.optim import FusedAdam, FusedRMSprop  # here: the package may be mid-build

        ours_cls, torch_cls = (FusedAdam, torch.optim.Adam) if algo == "adam" else (FusedRMSprop, torch.optim.RMSprop)
        # Without clipping, the torch behaviour on non-finite gradients: no norm pass at all.
        extra = {"max_grad_norm": MAX_NORM} if clip else {"on_nonfinite": "propagate"}
        ours = ours_cls(_params(shapes, device), **kwargs, **extra)
        fns: dict[str, Any] = {DLK: ours.step}
        variants = {EAGER: {"foreach": False}, "torch foreach": {"foreach": True}}
        if algo == "adam":
            variants["torch fused"] = {"fused": True}
        for name, flags in variants.items():
            fns[name] = _torch_step(torch_cls(_params(shapes, device), **kwargs, **flags), clip)
        # torch.compile of the for-loop step (clip included), as torch's optimizer tutorial does.
        fns[COMPILE] = torch.compile(_torch_step(torch_cls(_params(shapes, device), **kwargs, foreach=False), clip))
        return fns

    update, norm = 7 * 4 * numel, (4 * numel if clip else 0)
    name = f"{algo}{' momentum' if algo == 'rmsprop' else ''} {'clip' if clip else 'no clip'} {label}"
    traffic: dict[str, Any] = {"min_bytes": update + norm, "pattern": "inplace"}
    if clip and "passes" in {f.name for f in dataclasses.fields(Case)}:
        traffic["passes"] = {"read": norm, "inplace": update}
    # Probe bandwidth on a buffer as large as p, g and two states together: out of cache, as the step.
    return Case(name=name, setup=setup, size_bytes=16 * numel, device=device, **traffic,
                params={"algo": algo, "clip": clip, "params": label, "numel": numel, "tensors": len(shapes)})


def _torch_step(opt: torch.optim.Optimizer, clip: bool):
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
    return step


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Adam and RMSprop (momentum), with and without clipping, on 10 x 1M floats and ResNet-18."""
    sets = [("3 small", QUICK)] if quick else [("10x1M", TEN_1M), ("resnet18", RESNET18)]
    return [_case(algo, clip, label, shapes, device)
            for label, shapes in sets for algo in ("adam", "rmsprop") for clip in (True, False)]

"""Custom ops of the batch_norm family: batch normalization fused with an activation.

- ``batch_norm_act_train(x, w, b, prelu_w, eps, act, slope) -> (y, mean, invstd, var)``: batch
  statistics (one read of x) and the normalize+activate pass (one read, one write); autograd.
- ``batch_norm_act_eval(x, running_mean, running_var, w, b, prelu_w, eps, act, slope) -> y``:
  one pass with scale and shift folded per channel; autograd (frozen-BN fine-tuning).
- ``batch_norm_act_backward(...) -> (grad_x, grad_w, grad_b, grad_prelu)``: one reduction pass
  over (grad, x) and one elementwise pass; the pre-activation is recomputed from x and the
  per-channel statistics, never saved.
- ``batch_norm_act_train_dropout(x, ..., p, seed) -> (y, mean, invstd, var, seed)``: the training
  forward with dropout after the activation in the same pass (docs/dropout.md). As the dropout
  family's ops, it draws its seed inside the op when none is given, returns it, and is tagged
  nondeterministic_seeded; its backward is ``batch_norm_act_backward`` with ``p`` and the seed,
  whose two passes regenerate the mask (nothing per element is saved for it).
Running statistics are updated by the caller with torch ops on [C]-sized buffers (the momentum
factor may be a tensor, so ``momentum=None`` does not break ``fullgraph``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dlkernels import _backend
from dlkernels._backend import impl, use_backend
from dlkernels._dtypes import REDUCED_DTYPES, compute_dtype
from dlkernels.codes import Activation
from dlkernels.ops import _checks
from dlkernels.ops._op import _is_compiling, custom_op, eager_call, eager_entry
from dlkernels.ops.dropout import _SEEDED, _check_p, _seed_arg, _seed_fake, _seed_used
from dlkernels.reference.batch_norm import ACT_NONE, ACT_PRELU, eval_stats

_FAMILY = "batch_norm"
FUNCTIONAL = ("batch_norm", "batch_norm_act")
# activation= names (dlkernels/codes.py): None, then the members' names in lower case
ACTIVATIONS = {None: ACT_NONE} | {a.name.lower(): int(a) for a in Activation if a != ACT_NONE}




def _channel_empty(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=compute_dtype(x))


def kernels(name: str, x: Tensor):
    return impl(_FAMILY, name, x.device)


# ---- training forward ----

@custom_op("dlkernels::batch_norm_act_train", mutates_args=())
def _train(x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None, eps: float,
           act: int, slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels("batch_norm_act_train", x)(x, weight, bias, prelu_weight, eps, act, slope)


@_train.register_fake
def _(x, weight, bias, prelu_weight, eps, act, slope):
    return torch.empty_like(x), _channel_empty(x), _channel_empty(x), _channel_empty(x)


def _train_setup(ctx, inputs, output) -> None:
    x, weight, bias, prelu_weight, _, act, slope = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, invstd)
    ctx.act, ctx.slope, ctx.training = act, slope, True


def _input_grads(ctx, grad: Tensor, need: tuple[bool, bool, bool, bool]) -> list[Tensor | None]:
    """Gradients for (x, weight, bias, prelu_weight), None where not needed."""
    x, weight, bias, prelu_weight, mean, invstd, *seed = ctx.saved_tensors  # the seed: under dropout
    if not ctx.training:  # eval saved the running statistics: the backward derives invstd
        mean, invstd = eval_stats(x, mean, invstd, ctx.eps)
    drop = (ctx.p, seed[0]) if seed else ()
    grads = _backward_op(grad, x, weight, bias, prelu_weight, mean, invstd, ctx.act, ctx.slope, ctx.training, *drop)
    return [g if n else None for g, n in zip(grads, need, strict=True)]


def _backward(ctx, grad: Tensor, *unused: Tensor):
    return (*_input_grads(ctx, grad, ctx.needs_input_grad[:4]), None, None, None)


_train.register_autograd(_backward, setup_context=_train_setup)


# ---- training forward with dropout after the activation ----

@custom_op("dlkernels::batch_norm_act_train_dropout", tags=_SEEDED)
def _train_dropout(x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None, eps: float,
                   act: int, slope: float, p: float,
                   seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    s = _seed_used(seed)
    return (*kernels("batch_norm_act_train", x)(x, weight, bias, prelu_weight, eps, act, slope, p, int(s)), s)


@_train_dropout.register_fake
def _(x, weight, bias, prelu_weight, eps, act, slope, p, seed):
    return torch.empty_like(x), _channel_empty(x), _channel_empty(x), _channel_empty(x), _seed_fake()


def _train_dropout_setup(ctx, inputs, output) -> None:
    x, weight, bias, prelu_weight, _, act, slope, p, _ = inputs
    _, mean, invstd, _, seed = output
    # the seed (8 bytes), not a mask: the backward regenerates it
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, invstd, seed)
    ctx.act, ctx.slope, ctx.training, ctx.p = act, slope, True, p


def _train_dropout_backward(ctx, grad: Tensor, *unused: Tensor):
    return (*_input_grads(ctx, grad, ctx.needs_input_grad[:4]), None, None, None, None, None)


_train_dropout.register_autograd(_train_dropout_backward, setup_context=_train_dropout_setup)


# ---- eval forward ----

@custom_op("dlkernels::batch_norm_act_eval", mutates_args=())
def _eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
          prelu_weight: Tensor | None, eps: float, act: int, slope: float) -> Tensor:
    return kernels("batch_norm_act_eval", x)(x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope)


@_eval.register_fake
def _(x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope):
    return torch.empty_like(x)


def _eval_setup(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope = inputs
    # the buffers themselves (autograd's version check guards them), not derived copies: no
    # per-call work for the backward a forward in eval mode rarely gets
    ctx.save_for_backward(x, weight, bias, prelu_weight, running_mean, running_var)
    ctx.act, ctx.slope, ctx.training, ctx.eps = act, slope, False, eps


def _eval_backward(ctx, grad: Tensor):
    n = ctx.needs_input_grad
    gx, gw, gb, gp = _input_grads(ctx, grad, (n[0], n[3], n[4], n[5]))
    return gx, None, None, gw, gb, gp, None, None, None


_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- backward ----

@custom_op("dlkernels::batch_norm_act_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None,
                 mean: Tensor, invstd: Tensor, act: int, slope: float, training: bool, p: float = 0.0,
                 seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # p > 0: the forward's dropout, whose mask both passes regenerate from the seed
    drop = (p, int(seed)) if p > 0 else ()
    gx, sum_dz, sum_dz_xhat, grad_prelu = kernels("batch_norm_act_backward", x)(
        grad, x, mean, invstd, weight, bias, prelu_weight, act, slope, training, *drop)
    # Copies: a backend may return both sums as rows of one buffer, and op outputs may not alias.
    gw = sum_dz_xhat.to(weight.dtype, copy=True) if weight is not None else sum_dz_xhat.new_empty(0)
    gb = sum_dz.to(bias.dtype, copy=True) if bias is not None else sum_dz.new_empty(0)
    return gx, gw, gb, grad_prelu


@_backward_op.register_fake
def _(grad, x, weight, bias, prelu_weight, mean, invstd, act, slope, training, p=0.0, seed=None):
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0, dtype=compute_dtype(x))
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0, dtype=compute_dtype(x))
    gp = torch.empty_like(prelu_weight) if act == ACT_PRELU else x.new_empty(0, dtype=compute_dtype(x))
    return torch.empty_like(x), gw, gb, gp


# ---- public entry: torch's checks, then the ops, then the running statistics ----

# The eager fast path: a plain CPU call without dropout in one C++ call (csrc/eager/batch_norm.cpp)
_eager_batch_norm_act = eager_entry("batch_norm_act")


def _check_dtypes(input: Tensor, params: list[Tensor | None]) -> None:
    """torch's CPU rule: parameters share the input's dtype, or are all float32 for fp16/bf16 input."""
    dtypes = {p.dtype for p in params if p is not None}
    if not dtypes or dtypes == {input.dtype}:
        return
    if input.dtype in REDUCED_DTYPES and dtypes == {torch.float32}:
        return
    if input.dtype == torch.float64 and dtypes == {torch.float32}:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")


def _check(input, running_mean, running_var, weight, bias, training, eps, activation, prelu_weight,
           local_batch: bool = True) -> None:
    """torch's checks; ``local_batch=False`` leaves the batch-size check to the caller (SyncBatchNorm
    checks the total over all ranks)."""
    _checks.tensor_arg("batch_norm", "input", 1, input)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training:
        size = input.shape
        prods = size[0] if input.dim() > 0 else 1
        for d in size[2:]:
            prods *= d
        if prods == 1 and local_batch:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    elif running_mean is None and input.numel() > 0:  # torch returns an empty input as it is
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if input.dim() < 2:
        raise ValueError(f"dlkernels batch_norm: input needs a channel dimension (dim 1), got {input.dim()}-d input")
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    if activation == "prelu":
        if prelu_weight is None:
            raise ValueError("activation='prelu' needs prelu_weight")
        if prelu_weight.numel() not in (1, channels):
            raise RuntimeError(
                "Mismatch of parameter numbers and input channel size. Found parameter numbers = "
                f"{prelu_weight.numel()} and channel size = {channels}.")
    for t in (running_mean, running_var, weight, bias, prelu_weight):
        if t is not None:
            _checks.same_device(t, input)
    if input.dtype not in _checks.FLOAT_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_checks.scalar_type_name(input.dtype)}'")
    _check_dtypes(input, [running_mean, running_var, weight, bias])


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float | Tensor = 0.1,
               eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.batch_norm: statistics over every dim but 1; in training the running
    statistics (if given) are updated in place with ``momentum`` (a float or a 0-d tensor)."""
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation=None)


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float | Tensor = 0.1, eps: float = 1e-5, activation: str | None = "leaky_relu",
                   negative_slope: float = 0.01, prelu_weight: Tensor | None = None, dropout: float = 0.0, *,
                   generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """``activation(batch_norm(...))`` in one fused pass (two in training: statistics, then
    normalize+activate). activation: None, "relu", "leaky_relu" (negative_slope) or "prelu"
    (prelu_weight: 1 or C slopes). The backward recomputes the pre-activation instead of saving it.

    dropout: in training, ``dlkernels.functional.dropout(y, dropout, seed=...)`` of that output in
    the same pass (bit for bit), its mask regenerated by the backward from the seed rather than
    saved. ``seed`` (an int) or ``generator`` (one 64-bit draw) fixes the mask; by default the op
    draws one value from torch's default CPU generator. The running statistics are those of the
    input, as without dropout; eval (``training=False``) applies no dropout and draws nothing."""
    if seed is None and generator is None and not _is_compiling():
        y = _eager_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                                  negative_slope, prelu_weight, dropout)
        if y is not None:
            return y
    _check(input, running_mean, running_var, weight, bias, training, eps, activation, prelu_weight)
    act = ACTIVATIONS[activation]
    slope = _checks.number_arg("batch_norm_act", "negative_slope", 10, negative_slope)
    p = _check_p(dropout)
    prelu = prelu_weight if act == ACT_PRELU else None
    if not training:
        _check_seed_args(seed, generator)
        if running_mean is None:  # an empty input (checked above): as torch, an empty output
            return input.clone()
        return _eval(input, running_mean, running_var, weight, bias, prelu, eps, act, slope)
    if p == 0.0 or p == 1.0 or input.numel() == 0:  # no mask to draw
        _check_seed_args(seed, generator)
        y, mean, _, var = _train(input, weight, bias, prelu, eps, act, slope)
        if p == 1.0:  # torch's dropout: y * 0 (a NaN or inf stays NaN)
            y = y * y.new_zeros(())
    else:
        y, mean, _, var, _ = _train_dropout(input, weight, bias, prelu, eps, act, slope, p, _seed_arg(seed, generator))
    if running_mean is not None and input.numel() > 0:  # an empty batch leaves them as they are, as torch
        update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
    return y


def _check_seed_args(seed: int | None, generator: torch.Generator | None) -> None:
    """dropout's checks of seed= and generator= where no mask is drawn (nothing is drawn)."""
    if seed is not None:
        _seed_arg(seed, generator)
    elif generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError(f"dropout: generator must be a CPU torch.Generator, got {generator!r}")


_cpu_update = getattr(getattr(_backend._C, "cpu", None), "batch_norm_update_stats_", None)
_BUFFER_DTYPES = (torch.float32, torch.float64)


def _plain_cpu_buffers(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                       momentum: float | Tensor) -> bool:
    """The update may take the C++ path: plain eager (no compiling, tracing, modes or tensor
    subclasses), CPU, float32/float64 contiguous buffers of one dtype, a number momentum."""
    return (type(momentum) is float and running_mean.device.type == "cpu" and running_var.device.type == "cpu"
            and running_mean.dtype in _BUFFER_DTYPES and running_var.dtype == running_mean.dtype
            and mean.device.type == "cpu" and var.device.type == "cpu"
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and eager_call((running_mean, running_var, mean, var)) != 0)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                         momentum: float | Tensor) -> None:
    """torch's update, ``momentum * batch + (1 - momentum) * running`` (the running variance takes the
    unbiased batch variance). Not as a lerp: for momentum >= 0.5 lerp computes end - (end - start) * (1 - w),
    which turns an overflowed (inf) batch variance into inf - inf = NaN where torch keeps inf."""
    if _cpu_update is not None and _plain_cpu_buffers(running_mean, running_var, mean, var, momentum):
        # eager, CPU float32/float64 buffers: one C++ call (the tensor ops below cost ~12 us per
        # call, more than a small batch norm's kernels), torch's CPU formula, in float64
        _cpu_update(running_mean, running_var, mean, var, count, momentum)
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        # fp16/bf16 buffers in float32, as torch: a large variance overflows fp16 before * momentum
        if running_mean.dtype in REDUCED_DTYPES:
            for buf, stat in ((running_mean, mean), (running_var, unbiased)):
                buf.copy_(stat * momentum + buf.float() * (1 - momentum))
        elif isinstance(momentum, Tensor):  # momentum=None's cumulative factor
            running_mean.copy_(mean * momentum + running_mean * (1 - momentum))
            running_var.copy_(unbiased * momentum + running_var * (1 - momentum))
        else:  # foreach ops for both buffers: on small inputs these ops cost more than the kernels
            bufs = [running_mean, running_var]
            torch._foreach_mul_(bufs, 1.0 - momentum)
            torch._foreach_add_(bufs, [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], alpha=momentum)


# ---- synchronized statistics ----

def sync_batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None, bias: Tensor | None, momentum: float | Tensor, eps: float,
                        activation: str | None, negative_slope: float, prelu_weight: Tensor | None,
                        group: Any, dropout: float = 0.0) -> Tensor:
    """Training-mode batch_norm_act with statistics over every rank of ``group`` (a
    torch.distributed process group, already initialized), as torch's SyncBatchNorm. dropout: as
    batch_norm_act's, each rank's mask over its own input (seed from the default generator)."""
    _check(input, running_mean, running_var, weight, bias, True, eps, activation, prelu_weight,
           local_batch=False)  # the total over all ranks is checked once they are gathered
    act = ACTIVATIONS[activation]
    prelu = prelu_weight if act == ACT_PRELU else None
    slope = _checks.number_arg("sync_batch_norm_act", "negative_slope", 9, negative_slope)
    p = _check_p(dropout)
    y = _SyncBatchNormAct.apply(input, weight, bias, prelu, running_mean, running_var, eps, momentum, act, slope,
                                group, p if p < 1.0 else 0.0)
    return y * y.new_zeros(()) if p == 1.0 else y


class _SyncBatchNormAct(torch.autograd.Function):
    """Local moments -> all_gather -> merged global moments -> fused forward; the backward
    all-reduces the two per-channel sums. Weight/bias/slope gradients stay local, as torch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, prelu, running_mean, running_var, eps, factor, act, slope, group, p):
        k = lambda name: kernels(name, x)  # noqa: E731
        mean, var = k("batch_norm_stats")(x)
        count = torch.full_like(mean, x.numel() // max(x.shape[1], 1))
        # n, mean, M2; an empty rank contributes (0, 0, 0), not its NaN statistics (torch drops it)
        empty = count == 0
        mine = torch.stack([count, mean.masked_fill(empty, 0), (var * count).masked_fill(empty, 0)])
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        n_i, mean_i, m2_i = torch.stack(gathered).unbind(1)
        n = n_i.sum(0)
        g_mean = (n_i * mean_i).sum(0) / n
        g_var = (m2_i + n_i * (mean_i - g_mean) ** 2).sum(0) / n
        invstd = torch.rsqrt(g_var + eps)
        total = int(n[0].item())
        if total == 1:  # over all ranks, as torch (every rank empty: an empty output, stats unchanged)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        if running_mean is not None and total > 0:
            update_running_stats(running_mean, running_var, g_mean, g_var, total, factor)
        # dropout (p > 0 on a non-empty input): one seed drawn here, kept for the backward's passes
        drop = (p, int(_seed_used(None))) if p > 0 and x.numel() > 0 else ()
        y = k("batch_norm_act_forward")(x, g_mean, invstd, weight, bias, prelu, act, slope, *drop)
        ctx.save_for_backward(x, weight, bias, prelu, g_mean, invstd)
        ctx.act, ctx.slope, ctx.group, ctx.total, ctx.drop = act, slope, group, total, drop
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, prelu, mean, invstd = ctx.saved_tensors
        k = lambda name: kernels(name, x)  # noqa: E731
        sum_dz, sum_dz_xhat, grad_prelu = k("batch_norm_act_backward_reduce")(
            grad, x, mean, invstd, weight, bias, prelu, ctx.act, ctx.slope, *ctx.drop)
        both = torch.stack([sum_dz, sum_dz_xhat])
        dist.all_reduce(both, group=ctx.group)
        gx = k("batch_norm_act_backward_elemt")(grad, x, mean, invstd, weight, bias, prelu, both[0], both[1],
                                                ctx.total, ctx.act, ctx.slope, *ctx.drop)
        gw = sum_dz_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dz.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        gp = grad_prelu if prelu is not None and ctx.needs_input_grad[3] else None
        return gx, gw, gb, gp, None, None, None, None, None, None, None, None


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over fused BN + PReLU, training (also with dropout) and
    eval, with gradients."""
    from dlkernels import functional  # imports this module: import at call time

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, 3, generator=gen) * 2 + 1).to(device)
    w, b, p = (torch.rand(6, generator=gen).to(device) for _ in range(3))
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[torch.Tensor]:
        out = []
        for training, xi, drop in ((True, x, 0.0), (False, x.to(memory_format=torch.channels_last), 0.0),
                                   (True, x.to(memory_format=torch.channels_last), 0.3)):
            xr, wr, br, pr = (t.clone().requires_grad_() for t in (xi, w, b, p))
            rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
            y = functional.batch_norm_act(xr, rm, rv, wr, br, training, activation="prelu", prelu_weight=pr,
                                          dropout=drop, seed=5)
            out += [y, rm, rv, *torch.autograd.grad(y, (xr, wr, br, pr), g)]
        return out

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

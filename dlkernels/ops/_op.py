"""``custom_op``: a torch.library custom op that plain eager calls skip.

Every op is a torch.library custom op (schema, fake implementation, autograd) because
torch.compile, opcheck, FakeTensor, vmap and tracing need one. But a call through it costs 20-150
us of Python on small inputs (argument normalization, the Python autograd kernel, dynamo's disable
wrapper), 5-40x a small kernel. In plain eager execution none of that machinery is in play, so
there the op calls its Python body (which calls the kernel) directly, under an equivalent
autograd.Function (the same setup_context and backward) when a gradient is needed. Anything else
- compiling or tracing, a dispatch or function mode, a tensor subclass (FakeTensor, DTensor,
functorch wrappers) - goes through the custom op, so the two paths give the same results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from dlkernels._backend import eager as _eager

_Parameter = torch.nn.Parameter
_PLAIN = (Tensor, _Parameter)
# Bound once: this runs on every op call.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_tracing = torch._C._get_tracing_state
_functorch = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch.is_grad_enabled


def _check_no_tangents(name: str, args: tuple) -> None:
    """dlkernels ops have no forward-mode AD formula (jvp): raise, as torch does for such ops, rather
    than return an output without a tangent (which is what the custom op would do)."""
    for a in args:
        for t in (a if type(a) in (list, tuple) else (a,)):
            if isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
                raise NotImplementedError(f"Trying to use forward AD with {name} that does not support it")


def eager_call(args: tuple) -> int:
    """0: go through the custom op (compiling or tracing, a dispatch or function mode, a tensor
    subclass such as FakeTensor, DTensor or a functorch wrapper); 1: plain eager, no gradient
    needed; 2: plain eager, some tensor needs a gradient."""
    if _is_compiling() or _dispatch_modes() or _function_modes() or _tracing() is not None \
            or _functorch() is not None:
        return 0
    need = _grad_enabled()
    grad = False
    for a in args:  # by exact type first: this loop runs on every call, over every argument
        cls = type(a)
        if cls is Tensor or cls is _Parameter:
            grad = grad or (need and a.requires_grad)
        elif cls is list or cls is tuple:
            for t in a:
                if isinstance(t, Tensor):
                    if type(t) not in _PLAIN:
                        return 0
                    grad = grad or (need and t.requires_grad)
        elif isinstance(a, Tensor):  # a subclass
            return 0
    return 2 if grad else 1


class Op:
    """A custom op (``.custom``, a torch.library CustomOpDef; ``torch.ops.dlkernels.<name>``) whose
    plain eager calls run ``fn`` directly. Register the fake and the autograd on this object."""

    def __init__(self, qualname: str, fn: Callable, mutates_args: tuple[str, ...], tags: tuple = ()) -> None:
        self.fn = fn
        self.custom = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, tags=tags)
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        self.custom.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        # The same formula as an autograd.Function. Its forward takes ctx and calls setup_context
        # itself: the separate-setup_context form binds default arguments with inspect on every
        # call (tens of microseconds).
        def forward(ctx, *args: Any) -> Any:
            out = fn(*args)
            setup_context(ctx, args, out)
            return out

        self._function = type(f"{fn.__name__}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args: Any) -> Any:
        if _forward_ad._current_level >= 0:  # inside a dual_level block: a tangent would be lost
            _check_no_tangents(self.custom._qualname, args)
        how = eager_call(args)
        if how == 1:
            return self.fn(*args)
        if how == 2 and self._function is not None:
            return self._function.apply(*args)
        return self.custom(*args)


def _not_handled(*args: Any) -> None:
    return None


def eager_entry(name: str) -> Callable[..., Any]:
    """``dlkernels._C.eager.<name>``: one C++ call (checks, kernel, autograd node) for a plain eager call
    on CPU tensors, returning None for any other call, which then takes the op path (csrc/eager/eager.h).
    Call it only when not compiling (``_is_compiling()``): dynamo cannot trace into C++.
    Without the extension, an entry that handles nothing."""
    return getattr(_eager, name, _not_handled)


def custom_op(qualname: str, *, mutates_args: tuple[str, ...] = (), tags: tuple = ()) -> Callable[[Callable], Op]:
    """Decorator: ``torch.library.custom_op(qualname, mutates_args=..., tags=...)`` with the eager
    fast path."""
    return lambda fn: Op(qualname, fn, mutates_args, tags)

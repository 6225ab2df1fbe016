"""``dlkernels.fuse(model)``: dlkernels modules in a torch model, BatchNorm -> activation chains fused;
``dlkernels.unfuse(model)``: back to plain torch modules with the same state.

What fuse does (docs/DESIGN.md, "dlkernels.fuse"):

- 1:1 twins (``dlkernels/nn/_twins.py``, filled by each family's file): a module whose type is exactly a
  registered torch class gets the dlkernels class by ``module.__class__ = twin``. The twin subclasses
  the torch class and adds no state, so the object, its parameters, buffers, hooks, training flag,
  device, dtype and state_dict keys stay. Subclasses of torch's classes are left (their code may differ).
- Chains ``BatchNorm -> ReLU | LeakyReLU | PReLU [-> Dropout]`` are found in torch.fx traces of the
  whole model (one per training mode, so a forward that branches on ``self.training`` is seen both
  ways). A BatchNorm is fused when every call of it feeds exactly one activation call (a module or a
  functional relu / leaky_relu with a constant slope), always the same one. It becomes the registered
  BatchNormAct class in place (``_BatchNormAct.adopt``: same object, same state_dict keys; a PReLU's
  weight is read from the PReLU's own path, not registered twice). The activation call is then skipped:
  an activation module called only at chain sites is replaced at its path(s) by ``FusedActivation``
  (a pass-through holding its parameters under their names); otherwise (a module also called elsewhere,
  as torchvision BasicBlock's ``self.relu``, or a functional call) the forward of the module whose code
  makes the call is traced alone (its submodules as leaves) and regenerated without that call, as that
  instance's own ``forward`` (``RewrittenForward``); the class and every other call site are untouched.
- A model that does not trace gets the 1:1 swaps, and chains only between consecutive children of an
  ``nn.Sequential`` whose modules are registered once.
- A BatchNorm or activation with hooks is not fused into a chain (its hook would see another tensor).

Choices (where they differ from the first design notes, why):

- The code is in ``dlkernels/_fuse.py``, not ``fuse.py``: ``dlkernels.fuse`` is the function, which
  would shadow a submodule of that name (``import dlkernels.fuse as m`` would give the function).
- The forward override is a small callable object holding the generated source, not a
  ``types.MethodType`` of an exec'd function: a bound method deep-copies, but pickles as
  ``getattr(module, "forward")``, which on load silently gives the class's forward back (the activation
  would run twice); ``RewrittenForward`` deep-copies and pickles (``torch.save(model)``) correctly.
- An already fused model (anything fuse put there: a module marked by fuse, a FusedActivation, a
  RewrittenForward) raises ValueError; dlkernels modules the user built are left as they are.
- A torch ``nn.Dropout`` right after every call of a chain's activation, called nowhere else and without
  hooks, goes into the BatchNormAct (``dropout=p``, read at fuse time as the activation's slope is; its
  mask is the one dlkernels' Dropout would draw, from the same seed) and a ``FusedActivation`` stands at
  its path. Any other Dropout is swapped 1:1.
- Tracing treats subclasses of torch.nn modules as leaves too (fx would trace into a user's BatchNorm2d
  subclass, whose input check stops the trace); they are not fused anyway. SyncBatchNorm has its 1:1
  twin as well; it starts no chain.
- fx sees only ``forward``: a module also called from other methods, or from code that did not run
  while tracing, is not accounted for. Attribute-dependent branches of a rewritten forward are frozen
  as traced (it is regenerated code), as they are in any fx graph.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

import dlkernels.nn  # noqa: F401  (importing the families fills the twin tables)
from dlkernels._dtypes import FLOAT_DTYPES
from dlkernels.nn import _twins

__all__ = ["FusedActivation", "RewrittenForward", "fuse", "unfuse"]

_MARK = "_dlk_fused"  # instance attribute on every module whose class fuse changed: the torch class it had
Module = torch.nn.Module


class FusedActivation(Module):
    """Stands at an activation module's (or an absorbed Dropout's) path once the BatchNormAct before each
    of its calls does its work: passes its input through. Holds the activation's parameters and buffers
    under their own names (PReLU's ``weight``: same state_dict key, same Parameter), and the original
    module for unfuse."""

    def __init__(self, original: Module, done_by: str) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: its parameters are registered here
        self.done_by = done_by
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        self.training = original.training

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    def restore(self) -> Module:
        """The original module, with the current parameters, buffers and training flag."""
        original = self._original
        original._parameters.update(self._parameters)
        original._buffers.update(self._buffers)
        original.training = self.training
        return original

    def extra_repr(self) -> str:
        return f"{self._original!r} done by {self.done_by}"


def _compile_forward(import_block: str, src: str) -> Callable[..., Any]:
    return fx.graph_module._forward_from_src(import_block + "\n" + src, {})


class RewrittenForward:
    """One instance's own ``forward``: its class's forward as torch.fx traced it (submodules as leaves),
    less the activation calls that fused BatchNormAct modules now make. Kept as source, so a fused model
    deep-copies and pickles."""

    def __init__(self, owner: Module, src: str, import_block: str, dropped: tuple[str, ...],
                 fn: Callable[..., Any] | None = None) -> None:
        self.owner, self.src, self.import_block, self.dropped = owner, src, import_block, dropped
        self.fn = fn if fn is not None else _compile_forward(import_block, src)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.owner, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> RewrittenForward:
        return RewrittenForward(copy.deepcopy(self.owner, memo), self.src, self.import_block, self.dropped, self.fn)

    def __reduce__(self) -> tuple[Any, ...]:
        # the owner is memoized by pickle before its __dict__ (holding this) is saved: the cycle is fine
        return (RewrittenForward, (self.owner, self.src, self.import_block, self.dropped))

    def __repr__(self) -> str:
        return f"<forward of {type(self.owner).__name__} without {', '.join(self.dropped)}>"


# ---------------------------------------------------------------------------------------------------- checks

def _check_model(model: object, fn: str) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"{fn}() takes a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{fn}() cannot change a TorchScript module ({type(model).__name__}): its code is compiled; "
                        f"call {fn}() on the eager model, before torch.jit.script/trace")
    if type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo"):
        raise TypeError(f"{fn}() takes the eager model: call it before torch.compile (or on model._orig_mod)")


def _fuse_artifact(model: Module) -> str | None:
    for path, m in model.named_modules():
        where = path or "the model"
        if isinstance(m, FusedActivation):
            return f"{where} is a FusedActivation"
        if isinstance(m.__dict__.get("forward"), RewrittenForward):
            return f"{where} has a forward rewritten by fuse"
        if _MARK in m.__dict__:
            return f"{where} is a {type(m).__name__} put there by fuse"
    return None


def _has_hooks(m: Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _dtype_problem(m: Module) -> str | None:
    for name, t in [*m._parameters.items(), *m._buffers.items()]:
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.dtype not in FLOAT_DTYPES:
            return f"{name} is {t.dtype}; dlkernels kernels take {', '.join(str(d) for d in FLOAT_DTYPES)}"
    return None


def _walk(root: Module) -> Iterator[tuple[str, Module]]:
    """Every module once, with its first path; nothing inside a TorchScript module (it cannot change)."""
    seen: set[int] = set()

    def visit(path: str, m: Module) -> Iterator[tuple[str, Module]]:
        if id(m) in seen:
            return
        seen.add(id(m))
        yield path, m
        if isinstance(m, torch.jit.ScriptModule):
            return
        for name, child in m._modules.items():
            if child is not None:
                yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", root)


def _registrations(root: Module, target: Module) -> list[tuple[Module, str, str]]:
    """Every (parent, name, path) under which ``target`` is registered."""
    return [(m, name, f"{path}.{name}" if path else name) for path, m in _walk(root)
            for name, child in m._modules.items() if child is target]


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _name(cls: type) -> str:
    """torch.nn.BatchNorm2d, dlkernels.nn.BatchNormAct2d, or the class's own name."""
    for package in ("torch", "dlkernels"):
        if cls.__module__.startswith(f"{package}.nn"):
            return f"{package}.nn.{cls.__name__}"
    return cls.__qualname__


# ---------------------------------------------------------------------------------------------------- tracing

_CONTAINERS = (Module, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _torch_leaf_type(cls: type) -> bool:
    """A torch.nn module class other than the containers, or a subclass of one (a user's BatchNorm2d
    subclass: traced into, its input checks would stop the trace, and it is not fused anyway)."""
    return any(base.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and base not in _CONTAINERS
               for base in cls.__mro__[:-1])


class _Tracer(fx.Tracer):
    """torch.nn modules and their subclasses are leaves, and dlkernels and TorchScript modules.
    ``all_leaves``: every submodule is a leaf (tracing one module's own forward)."""

    def __init__(self, all_leaves: bool = False) -> None:
        super().__init__()
        self.all_leaves = all_leaves

    def is_leaf_module(self, m: Module, module_qualified_name: str) -> bool:
        return (self.all_leaves or super().is_leaf_module(m, module_qualified_name) or _torch_leaf_type(type(m))
                or type(m).__module__.startswith("dlkernels.") or isinstance(m, torch.jit.ScriptModule))


def _optional_args(module: Module) -> dict[str, Any] | None:
    """The forward's parameters with defaults, and their defaults; None for ``*args`` / ``**kwargs``."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return {p.name: p.default for p in params if p.default is not p.empty}


def _trace_variants(root: Module, all_leaves: bool) -> list[fx.Graph]:
    """The distinct graphs of ``root``'s forward in eval and in training mode, and, where it has optional
    arguments, with them left out as well as given (fx traces them as given: ``if mask is None`` would
    only be seen one way). Training flags are set directly (a module's own train() may do more) and restored."""
    if "forward" in root.__dict__:
        raise RuntimeError("its forward is set on the instance (fx traces the class's forward)")
    defaults = _optional_args(root)
    flags = [(m, m.training) for m in root.modules()]
    graphs: dict[str, fx.Graph] = {}
    try:
        for mode in (False, True):
            for m, _ in flags:
                m.training = mode
            for concrete in (None, defaults or None):
                graph = _Tracer(all_leaves).trace(root, concrete_args=concrete)
                graphs.setdefault(graph.python_code("self").src, graph)
    finally:
        for m, training in flags:
            m.training = training
    return list(graphs.values())


def _caller(node: fx.Node) -> str:
    """Path of the module whose forward's code makes this call ("" for the root)."""
    stack = [qualname for qualname, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module":
        stack = stack[:-1]  # a leaf's own entry
    return stack[-1] if stack else ""


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{getattr(node.target, '__name__', node.target)}()"


# ---------------------------------------------------------------------------------------------------- plan
# Analysis only: nothing in the model changes (training flags set for tracing are restored).

@dataclasses.dataclass
class _Site:
    """One call of a BatchNorm whose only user is a chain activation."""

    bn: Module
    bn_node: fx.Node
    act_node: fx.Node
    act_module: Module | None  # None: a functional call
    activation: str
    negative_slope: float
    parent: str  # whose forward calls the activation
    bn_parent: str  # whose forward calls the BatchNorm
    dropout: tuple[str, Module] | None

    def key(self) -> tuple[Any, ...]:
        """What the fused module computes: the same for every call of one BatchNorm."""
        slope = self.negative_slope if self.activation == "leaky_relu" else None
        return (self.activation, slope, id(self.act_module) if self.activation == "prelu" else None)

    def act_text(self) -> str:
        return str(self.act_node.target) if self.act_module is not None else _describe(self.act_node)


@dataclasses.dataclass
class _Chain:
    bn: Module
    path: str
    fused_cls: type
    activation: str
    negative_slope: float
    act_module: Module | None
    act_text: str
    placeholder: bool  # the activation module is replaced at its path(s); else its calls leave the forwards
    dropouts: dict[str, Module]
    rewritten: tuple[str, ...] = ()  # the modules whose forward no longer makes the activation call


@dataclasses.dataclass
class _Rewrite:
    owner: Module
    path: str
    src: str
    import_block: str
    fn: Callable[..., Any]
    dropped: tuple[str, ...]


@dataclasses.dataclass
class _Placeholder:
    act: Module
    registrations: list[tuple[Module, str, str]]
    done_by: str


@dataclasses.dataclass
class _Plan:
    not_traced: str | None = None  # why the model did not trace
    swaps: list[tuple[str, Module, type]] = dataclasses.field(default_factory=list)
    chains: list[_Chain] = dataclasses.field(default_factory=list)
    placeholders: dict[int, _Placeholder] = dataclasses.field(default_factory=dict)
    rewrites: list[_Rewrite] = dataclasses.field(default_factory=list)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why it is not (fully) fused


def _chain_at(root: Module, node: fx.Node, bn: Module) -> _Site | str:
    """The chain starting at this call of ``bn``, or why there is none."""
    users = list(node.users)
    if len(users) != 1:
        return f"its output goes to {len(users)} places" if users else "its output is not used"
    act = users[0]
    uses: list[fx.Node] = []
    fx.node.map_arg((act.args, act.kwargs), uses.append)
    if not act.args or act.args[0] is not node or uses.count(node) != 1:
        return f"its output goes to {_describe(act)}, not as its first argument"
    act_module = None
    if act.op == "call_module":
        act_module = root.get_submodule(str(act.target))
        reader = _twins.CHAIN_ACT_MODULES.get(type(act_module))
        if reader is None:
            base = next((c for c in _twins.CHAIN_ACT_MODULES if isinstance(act_module, c)), None)
            return (f"{act.target} is a subclass of {_name(base)}" if base is not None
                    else f"it is followed by {act.target} ({type(act_module).__name__}), not an activation")
        if _has_hooks(act_module):
            return f"{act.target} has hooks (they would see another tensor)"
        if len(act.args) != 1 or act.kwargs:
            return f"{act.target} is called with more than its input"
        read = reader(act_module)
        if not isinstance(read, str) and read[0] == "prelu" and act_module.weight.numel() not in (1, bn.num_features):
            read = f"{act.target} has {act_module.weight.numel()} slopes for {bn.num_features} channels"
    elif act.op in ("call_function", "call_method") and act.target in _twins.CHAIN_ACT_CALLS:
        read = _twins.CHAIN_ACT_CALLS[act.target](act.args, act.kwargs)  # type: ignore[index]
    else:
        return f"it is followed by {_describe(act)}, not an activation"
    if isinstance(read, str):
        return read
    if act.all_input_nodes != [node]:
        return f"it is followed by {_describe(act)} with other tensor inputs"
    dropout = None
    if len(act.users) == 1:
        nxt = next(iter(act.users))
        if nxt.op == "call_module" and nxt.all_input_nodes == [act] and len(nxt.args) == 1 and not nxt.kwargs:
            d = root.get_submodule(str(nxt.target))
            if type(d) in _twins.CHAIN_DROPOUTS and not _has_hooks(d):
                dropout = (str(nxt.target), d)
    return _Site(bn, node, act, act_module, read[0], read[1], _caller(act), _caller(node), dropout)


def _plan_traced(root: Module, graphs: list[fx.Graph], plan: _Plan, candidates: dict[int, str]) -> None:
    """Chains from the whole-model graphs. ``candidates``: id -> path of the BatchNorms that may be fused."""
    calls: dict[int, list[fx.Node]] = {}  # module id -> its call_module nodes, over all graphs
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                calls.setdefault(id(root.get_submodule(str(node.target))), []).append(node)

    sites: dict[int, list[_Site]] = {}
    for bn_id, path in candidates.items():
        bn = root.get_submodule(path)
        if bn_id not in calls:
            plan.notes[path] = "not called by the traced forward"
            continue
        found = [_chain_at(root, node, bn) for node in calls[bn_id]]
        why = next((f for f in found if isinstance(f, str)), None)
        if why is not None:
            plan.notes[path] = why
        elif len({s.key() for s in found if not isinstance(s, str)}) > 1:
            plan.notes[path] = "its calls are followed by different activations"
        else:
            sites[bn_id] = [s for s in found if not isinstance(s, str)]

    # Which activation calls need a forward rewritten depends on which chains are fused (an activation module
    # called only at chain sites is replaced instead), and a rewrite that fails unfuses chains: to a fixed point.
    traced_alone: dict[str, list[fx.Graph] | str] = {}
    while True:
        chain_act_nodes = {id(s.act_node) for ss in sites.values() for s in ss}
        only_chain = {m_id for m_id, nodes in calls.items() if all(id(n) in chain_act_nodes for n in nodes)}
        by_parent: dict[str, list[_Site]] = {}
        failed: dict[int, str] = {}
        for bn_id, ss in sites.items():
            for s in ss:
                if s.act_module is not None and id(s.act_module) in only_chain:
                    continue
                if s.parent != s.bn_parent:
                    failed[bn_id] = (f"it is called in the forward of {s.bn_parent or 'the model'} and "
                                     f"{s.act_text()} in that of {s.parent or 'the model'}")
                by_parent.setdefault(s.parent, []).append(s)
        rewrites: list[_Rewrite] = []
        for parent, ss in by_parent.items():
            done = _rewrite_parent(root, parent, ss, sites, only_chain, traced_alone)
            if isinstance(done, str):
                for s in ss:
                    failed.setdefault(id(s.bn), done)
            else:
                rewrites.append(done)
        if not failed:
            break
        for bn_id, why in failed.items():
            plan.notes[candidates[bn_id]] = why
            del sites[bn_id]

    plan.rewrites = rewrites
    for bn_id, ss in sites.items():
        s, path = ss[0], candidates[bn_id]
        placeholder = s.act_module is not None and id(s.act_module) in only_chain
        dropouts = _absorbable_dropout(ss, calls, plan, path)
        rewritten = tuple(sorted({x.parent or "the model" for x in ss} if not placeholder else ()))
        plan.chains.append(_Chain(s.bn, path, _twins.CHAINS[type(s.bn)], s.activation, s.negative_slope,
                                  s.act_module, s.act_text(), placeholder, dropouts, rewritten))
        if placeholder and id(s.act_module) not in plan.placeholders:
            plan.placeholders[id(s.act_module)] = _Placeholder(s.act_module, _registrations(root, s.act_module), path)
        for d in dropouts.values():
            plan.placeholders[id(d)] = _Placeholder(d, _registrations(root, d), path)


def _absorbable_dropout(sites: list[_Site], calls: dict[int, list[fx.Node]], plan: _Plan,
                        path: str) -> dict[str, Module]:
    """{path: module} of the Dropout that follows every call of this chain and is called nowhere else (it can
    go into the BatchNormAct), else {} (a note says why a Dropout after some call stays a module)."""
    found = {id(x.dropout[1]): x.dropout for x in sites if x.dropout is not None}
    if not found:
        return {}
    if len(found) == 1 and all(x.dropout is not None for x in sites):
        d_path, d = next(iter(found.values()))
        if len(calls.get(id(d), [])) == len(sites):
            return {d_path: d}
    for d_path, _ in found.values():
        plan.notes[d_path] = (f"after the chain at {path}, but also called elsewhere or not after each of its "
                              "calls: kept as a module of its own")
    return {}


def _rewrite_parent(root: Module, parent: str, need: list[_Site], sites: dict[int, list[_Site]],
                    only_chain: set[int], traced_alone: dict[str, list[fx.Graph] | str]) -> _Rewrite | str:
    """The forward of the module at ``parent`` without the activation calls after the BatchNorms of ``need``
    (traced alone, its submodules as leaves), or why it cannot be rewritten."""
    owner = root.get_submodule(parent)
    where = f"the forward of {parent or 'the model'} ({type(owner).__name__})"
    if parent not in traced_alone:
        try:
            if _optional_args(owner) != {}:  # a regenerated forward would keep one path, and lose keyword-only
                traced_alone[parent] = f"{where} takes optional or variable arguments"
            else:
                traced_alone[parent] = _trace_variants(owner, all_leaves=True)
        except Exception as e:  # noqa: BLE001  (whatever fx raises: this chain is not fused)
            traced_alone[parent] = f"{where} does not trace alone ({_short(e)})"
    got = traced_alone[parent]
    if isinstance(got, str):
        return got
    if len(got) > 1:
        return f"{where} depends on self.training"
    graph = copy.deepcopy(got[0])  # the traced graph stays whole for the next round
    allowed: dict[int, list[_Site]] = {id(s.bn): sites[id(s.bn)] for s in need}
    dropped: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = owner.get_submodule(str(node.target))
        if id(bn) not in allowed:
            continue
        users = list(node.users)
        act = users[0] if len(users) == 1 else None
        if act is None or act.all_input_nodes != [node]:
            return f"{where}, traced alone, uses {node.target}'s output otherwise"
        ss = allowed[id(bn)]
        if act.op == "call_module":
            act_module = owner.get_submodule(str(act.target))
            if all(act_module is not s.act_module for s in ss):
                return f"{where}, traced alone, calls {act.target} after {node.target}"
            if id(act_module) in only_chain:
                continue  # its FusedActivation passes the input through
        else:
            reader = _twins.CHAIN_ACT_CALLS.get(act.target)  # type: ignore[arg-type]
            ok = reader is not None and act.op in ("call_function", "call_method")
            read = reader(act.args, act.kwargs) if ok else "-"
            if all(s.act_module is not None or (s.activation, s.negative_slope) != read for s in ss):
                return f"{where}, traced alone, calls {_describe(act)} after {node.target}"
        prefix = f"{parent}." if parent else ""
        what = f"{prefix}{act.target}" if act.op == "call_module" else _describe(act)
        dropped.append(f"{what} after {prefix}{node.target}")
        act.replace_all_uses_with(node)
        graph.erase_node(act)
    if not dropped:
        return f"{where}, traced alone, does not make the activation call"
    graph.lint()
    code = graph.python_code("self")
    try:
        import_block = fx.graph_module._format_import_block(code.globals, fx.graph_module.sys_importer)
        fn = _compile_forward(import_block, code.src)
    except Exception as e:  # noqa: BLE001
        return f"{where} cannot be regenerated as source ({_short(e)})"
    return _Rewrite(owner, parent, code.src, import_block, fn, tuple(dropped))


def _plan_sequential(root: Module, plan: _Plan, candidates: dict[int, str]) -> None:
    """Without a trace: chains only between consecutive children of an nn.Sequential (run back to back by
    construction), each registered once (a module registered twice may be called from elsewhere)."""
    counts = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    paths = {id(m): path for path, m in _walk(root)}
    for _, seq in _walk(root):
        if type(seq) is not torch.nn.Sequential:
            continue
        children = [c for c in seq._modules.values() if c is not None]
        for i, bn in enumerate(children[:-1]):
            if id(bn) not in candidates or any(c.bn is bn for c in plan.chains):
                continue
            act = children[i + 1]
            reader = _twins.CHAIN_ACT_MODULES.get(type(act))
            read = reader(act) if reader is not None else f"it is followed by {type(act).__name__}, not an activation"
            if counts[id(bn)] != 1 or counts[id(act)] != 1:
                read = "it or the module after it is registered at more than one path"
            elif _has_hooks(act):
                read = f"{paths[id(act)]} has hooks (they would see another tensor)"
            elif not isinstance(read, str) and read[0] == "prelu" and act.weight.numel() not in (1, bn.num_features):
                read = f"{paths[id(act)]} has {act.weight.numel()} slopes for {bn.num_features} channels"
            if isinstance(read, str):
                plan.notes[candidates[id(bn)]] = read
                continue
            nxt = children[i + 2] if i + 2 < len(children) else None
            dropouts = {}
            if nxt is not None and type(nxt) in _twins.CHAIN_DROPOUTS and counts[id(nxt)] == 1 and not _has_hooks(nxt):
                dropouts = {paths[id(nxt)]: nxt}
            path = candidates[id(bn)]
            plan.chains.append(_Chain(bn, path, _twins.CHAINS[type(bn)], read[0], read[1], act, paths[id(act)], True,
                                      dropouts))
            plan.placeholders[id(act)] = _Placeholder(act, _registrations(root, act), path)
            for d in dropouts.values():
                plan.placeholders[id(d)] = _Placeholder(d, _registrations(root, d), path)
    fused = {id(c.bn) for c in plan.chains}
    for bn_id, path in candidates.items():
        if bn_id not in fused:
            plan.notes.setdefault(path, "not followed by an activation inside an nn.Sequential")


def _make_plan(root: Module) -> _Plan:
    plan = _Plan()
    candidates: dict[int, str] = {}  # BatchNorms that may start a chain
    dlk_classes = set(_twins.TWINS.values()) | set(_twins.CHAINS.values())
    for path, m in _walk(root):
        cls = type(m)
        if cls in dlk_classes:
            plan.notes[path] = f"already {_name(cls)}"
        elif cls in _twins.TWINS or cls in _twins.CHAINS:
            why = _dtype_problem(m)
            if why is not None:
                plan.notes[path] = f"unsupported: {why}"
                continue
            if cls in _twins.TWINS:
                plan.swaps.append((path, m, _twins.TWINS[cls]))
            if cls in _twins.CHAINS:
                if _has_hooks(m):
                    plan.notes[path] = "not fused with an activation: it has hooks (they would see another tensor)"
                else:
                    candidates[id(m)] = path
        elif isinstance(m, torch.jit.ScriptModule):
            plan.notes[path] = "a TorchScript module: its code is compiled, nothing inside it changes"
        elif cls not in _twins.CHAIN_ACT_MODULES:
            base = next((c for c in (*_twins.TWINS, *_twins.CHAIN_ACT_MODULES) if isinstance(m, c)), None)
            if base is not None and not isinstance(m, tuple(dlk_classes)):
                plan.notes[path] = f"a subclass of {_name(base)}: its own code may differ from the twin's"
    try:
        graphs = _trace_variants(root, all_leaves=False)
    except Exception as e:  # noqa: BLE001  (whatever fx raises: fall back to plain module swaps)
        plan.not_traced = _short(e)
        _plan_sequential(root, plan, candidates)
    else:
        _plan_traced(root, graphs, plan, candidates)
    changed = {id(c.bn) for c in plan.chains} | set(plan.placeholders)
    plan.swaps = [(p, m, t) for p, m, t in plan.swaps if id(m) not in changed]
    return plan


# ---------------------------------------------------------------------------------------------------- apply
# Each step records how to undo itself, so that a failure midway leaves an inplace model as it was.

Undo = list[Callable[[], object]]


def _swap_class(m: Module, cls: type, undo: Undo) -> None:
    old = type(m)
    m.__class__ = cls
    m.__dict__[_MARK] = old
    undo.append(lambda: (m.__dict__.pop(_MARK, None), setattr(m, "__class__", old)))


def _install_placeholder(p: _Placeholder, undo: Undo) -> FusedActivation:
    placeholder = FusedActivation(p.act, p.done_by)
    for parent, name, _ in p.registrations:
        parent._modules[name] = placeholder
        undo.append(lambda parent=parent, name=name: parent._modules.__setitem__(name, p.act))
    return placeholder


def _adopt(chain: _Chain, prelu_owner: Module | None, undo: Undo) -> None:
    old = type(chain.bn)
    chain.fused_cls.adopt(chain.bn, chain.activation, chain.negative_slope, prelu_owner)
    chain.bn.__dict__[_MARK] = old
    undo.append(lambda: (chain.bn.__dict__.pop(_MARK, None), chain.bn.release()))


def _install_forward(rw: _Rewrite, undo: Undo) -> None:
    object.__setattr__(rw.owner, "forward", RewrittenForward(rw.owner, rw.src, rw.import_block, rw.dropped, rw.fn))
    undo.append(lambda: rw.owner.__dict__.pop("forward", None))


def _apply(plan: _Plan, undo: Undo) -> list[tuple[str, str, str]]:
    """Carries the plan out; returns the report's lines (what, path, how)."""
    lines: list[tuple[str, str, str]] = []
    placeholders = {}
    for act_id, p in plan.placeholders.items():
        placeholders[act_id] = _install_placeholder(p, undo)
        for _, _, path in p.registrations:
            lines.append(("replaced", path, f"{type(p.act).__name__} -> FusedActivation (passes its input through: "
                                            f"{p.done_by} does its work)"))
    for chain in plan.chains:
        owner = None
        if chain.activation == "prelu":
            owner = placeholders[id(chain.act_module)] if chain.placeholder else chain.act_module
        old = type(chain.bn).__name__
        _adopt(chain, owner, undo)
        act = repr(chain.activation) + (f", negative_slope={chain.negative_slope}"
                                        if chain.activation == "leaky_relu" else "")
        how = ("its module replaced" if chain.placeholder
               else f"the call removed from the forward of {', '.join(chain.rewritten)}")
        drop = ""
        for path, d in chain.dropouts.items():  # at most one: the Dropout after every call (plan)
            chain.bn.dropout = float(d.p)  # release() (the undo of _adopt) drops it again
            act += f", dropout={d.p}"
            drop = f" and {path}"
        lines.append(("replaced", chain.path, f"{old} -> {_name(chain.fused_cls)}(activation={act}), fused with "
                                              f"{chain.act_text}{drop} ({how})"))
    for path, m, cls in plan.swaps:
        old = type(m).__name__
        note = plan.notes.pop(path, None)
        if note is not None and type(m) in _twins.CHAINS and not note.startswith("not fused"):
            note = f"not fused with an activation: {note}"
        _swap_class(m, cls, undo)
        lines.append(("replaced", path, f"{old} -> {_name(cls)}" + (f" ({note})" if note else "")))
    for rw in plan.rewrites:
        _install_forward(rw, undo)
        lines.append(("rewrote", rw.path,
                      f"the forward of this {type(rw.owner).__name__} (class untouched), without "
                      f"{'; '.join(rw.dropped)}"))
    return lines


def _report(root: Module, plan: _Plan, lines: list[tuple[str, str, str]]) -> str:
    how = ("traced with torch.fx" if plan.not_traced is None else
           f"did not trace with torch.fx ({plan.not_traced}): 1:1 swaps, and chains only inside nn.Sequential")
    entries = list(lines)
    done = {path for _, path, _ in lines}
    entries += [("left", path, why) for path, why in plan.notes.items() if path not in done]
    others: Counter[str] = Counter()
    order: dict[str, int] = {}
    for path, m in _walk(root):
        order[path] = len(order)
        if path in done or path in plan.notes or not path:
            continue
        if type(m) is torch.nn.ReLU:
            entries.append(("left", path, "ReLU has no dlkernels module of its own (it is fused only right after "
                                          "a BatchNorm)"))
        elif not isinstance(m, (FusedActivation, *_twins.TWINS.values(), *_twins.CHAINS.values())):
            others[type(m).__name__] += 1
    entries.sort(key=lambda e: (order.get(e[1], -1), e[0] == "rewrote"))
    out = [f"dlkernels.fuse: {type(root).__name__} {how}"]
    out += [f"  {what:<8} {path or '(the model)'}: {text}" for what, path, text in entries]
    if others:
        out.append(f"  {'left':<8} modules without a dlkernels twin: "
                   + ", ".join(f"{n} x{c}" for n, c in sorted(others.items())))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- API

def fuse(model: Module, *, inplace: bool = False, verbose: bool = False) -> Module:
    """``model`` with dlkernels modules: every module whose type is exactly a torch class with a dlkernels
    twin (BatchNorm1d/2d/3d, SyncBatchNorm, LeakyReLU, PReLU, Dropout, Dropout1d/2d/3d) becomes the twin,
    and every BatchNorm{1,2,3}d -> ReLU | LeakyReLU | PReLU chain run back to back in the forward becomes
    one BatchNormAct; everything else stays. The model keeps its class, methods, state_dict keys,
    parameters, buffers, training mode, device, dtype and hooks. A deep copy unless ``inplace`` (then the
    model itself, left as it was if anything fails). ``verbose``: print what was replaced, what was left
    and why. Raises TypeError for anything but an eager nn.Module, ValueError for a model fuse already
    fused. ``dlkernels.unfuse`` goes back."""
    _check_model(model, "fuse")
    artifact = _fuse_artifact(model)
    if artifact is not None:
        raise ValueError(f"fuse(): the model is already fused ({artifact}); call dlkernels.unfuse(model) first")
    target = model if inplace else _deepcopy(model, "fuse")
    plan = _make_plan(target)
    undo: Undo = []
    try:
        lines = _apply(plan, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    if verbose:
        print(_report(target, plan, lines))
    return target


def unfuse(model: Module, *, inplace: bool = False) -> Module:
    """Plain torch modules again: every dlkernels twin becomes its torch class, fused BatchNormAct modules
    their torch BatchNorm, FusedActivation the activation module it stands for, and rewritten forwards are
    removed; state_dict keys and values stay. A BatchNormAct built by hand (not by fuse) is left: it has no
    one-module torch equivalent. A deep copy unless ``inplace``."""
    _check_model(model, "unfuse")
    target = model if inplace else _deepcopy(model, "unfuse")
    originals: dict[int, Module] = {}
    for _, m in list(_walk(target)):
        for name, child in list(m._modules.items()):
            if isinstance(child, FusedActivation):
                if id(child) not in originals:  # registered at several paths: one original
                    originals[id(child)] = child.restore()
                m._modules[name] = originals[id(child)]
    reverse = {dlk: torch_cls for torch_cls, dlk in _twins.TWINS.items()}
    for _, m in list(_walk(target)):
        if isinstance(m.__dict__.get("forward"), RewrittenForward):
            del m.__dict__["forward"]
        m.__dict__.pop(_MARK, None)
        if "_adopted_from" in m.__dict__ and hasattr(m, "release"):
            m.release()
        elif type(m) in reverse:
            m.__class__ = reverse[type(m)]
    return target


def _deepcopy(model: Module, fn: str) -> Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise TypeError(f"{fn}(inplace=False) works on a deep copy and the model cannot be copied ({_short(e)}); "
                        "pass inplace=True") from e

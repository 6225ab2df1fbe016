"""Ahead-of-time compilation of every Triton kernel to a cubin, without a GPU.

Run in a process without ``TRITON_INTERPRET=1``: with it, ``@triton.jit`` makes interpreted
functions that ``triton.compile`` cannot take (AttributeError: no ``cache_key``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any


def families() -> list[str]:
    """The family modules of triton_ops (every public module; each defines AOT_SPECS)."""
    here = os.path.dirname(__file__)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_"))


@dataclass(frozen=True)
class AotSpec:
    """One compilation of a @triton.jit kernel.

    signature: runtime arguments only, in triton's type strings ("*fp32", "i32", "fp64");
    a ":16" suffix ("*bf16:16", "i32:16") marks a value divisible by 16, as the JIT specializes
    aligned pointers and sizes (this is what enables vector loads).
    constexprs: values of the tl.constexpr arguments (an integer 1 stands in for the JIT's
    specialization of integer arguments equal to 1, e.g. a single PReLU channel).
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, int | float] = field(default_factory=dict)


def interpreter_active() -> bool:
    """True when TRITON_INTERPRET is on, in which case AOT compilation cannot run."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL... of the (single) function in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}


def compile_spec(spec: AotSpec, arch: int) -> dict[str, Any]:
    """Compile ``spec`` for sm_<arch> and return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    if interpreter_active():
        raise RuntimeError("TRITON_INTERPRET is set: AOT compilation needs a process without it")
    fn = spec.kernel
    # triton 3.8 keys signature and constexprs by argument name; the JIT lists constexpr
    # arguments in the signature as "constexpr", so do the same.
    sig = {k: t.removesuffix(":16") for k, t in spec.signature.items()}
    sig.update({k: "constexpr" for k in spec.constexprs})
    missing = set(fn.arg_names) - set(sig)
    if missing:
        raise ValueError(f"{spec.name}: no type for arguments {sorted(missing)}")
    attrs = {
        (fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in spec.signature.items() if t.endswith(":16")
    }
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=spec.constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    cubin = ck.asm["cubin"]
    use = resource_usage(cubin)
    return {
        "name": spec.name,
        "arch": arch,
        "kernel": ck.name,
        "cubin_bytes": len(cubin),
        "num_warps": ck.metadata.num_warps,
        "n_regs": use["REG"],
        # Same definition as triton's CompiledKernel.n_spills: local memory bytes / 4.
        "n_spills": use.get("LOCAL", 0) // 4,
        "stack": use.get("STACK", 0),
        "shared": ck.metadata.shared,
    }


def all_specs() -> list[AotSpec]:
    """AOT_SPECS of every family, in name order."""
    specs: list[AotSpec] = []
    for fam in families():
        specs += importlib.import_module(f".{fam}", __package__).AOT_SPECS
    return specs

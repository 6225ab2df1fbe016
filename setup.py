"""Build of dlkernels._C: CPU kernels always, CUDA kernels when a CUDA torch and toolkit exist.

DLK_CUDA=0|1 forces the CUDA part off/on. No GPU is needed to build (only the toolkit).
"""

import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup


def _toolkit_root() -> str | None:
    """The CUDA toolkit root. The first `nvcc` on PATH may be a wrapper script, so ask nvcc
    itself (its --dryrun prints TOP=<root>/bin/..) rather than guessing from its path."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").write("__global__ void k() {}\n")
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _want_cuda(torch_cuda: str | None, root: str | None) -> bool:
    flag = os.environ.get("DLK_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if not torch_cuda or not root:
            raise RuntimeError(f"DLK_CUDA=1 but torch.version.cuda={torch_cuda!r} and CUDA toolkit root={root!r}")
        return True
    return bool(torch_cuda and root)


root = _toolkit_root()
if root and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _write_codes_header() -> None:
    """csrc/common/codes.h from dlkernels/codes.py, the one definition of the cross-language codes
    (loaded by path: the package's __init__ imports the extension being built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dlk_codes", os.path.join("dlkernels", "codes.py"))
    codes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codes)
    path = os.path.join("csrc", "common", "codes.h")
    text = codes.cpp_header()
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild of its users
        with open(path, "w") as f:
            f.write(text)


_write_codes_header()
with_cuda = _want_cuda(torch.version.cuda, root)
sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/bind/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp")) \
    + sorted(glob.glob("csrc/eager/*.cpp"))
# -fno-math-errno: sqrt that may set errno is a call GCC will not vectorize (optim kernels).
# -fno-trapping-math: lets GCC compute both sides of a select (`x > 0 ? x : x * s`) and blend,
# so those loops vectorize on AVX2 and SSE2 too (AVX-512 masks them either way); no value changes,
# and nothing here reads floating-point exception flags.
# -ffp-contract=off: no fused multiply-add unless the source asks for one (fma()); GCC otherwise
# contracts a * b + c on the AVX2/AVX-512 levels but not on SSE2, and the levels' results would
# differ in the last bit.
cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wall",
       "-Wno-unused-function"]
ext_kwargs = dict(extra_link_args=["-fopenmp"])
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = ["-DDLK_WITH_CUDA", f'-DDLK_CUDA_ARCH_LIST="{arch}"']
    ext = CUDAExtension(
        "dlkernels._C", sources,
        extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3", "-lineinfo"] + defines},
        **ext_kwargs,
    )
else:
    ext = CppExtension("dlkernels._C", sources, extra_compile_args={"cxx": cxx}, **ext_kwargs)

setup(
    packages=find_packages(include=["dlkernels", "dlkernels.*", "triton_ops", "triton_ops.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

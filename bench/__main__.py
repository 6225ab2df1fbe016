"""``python -m bench [--quick] [--only FAMILY[,FAMILY]] [--alloc both|default|reuse] [--no-compile]
[--cpu-capability auto|LEVEL[,LEVEL]] [--omp-wait auto|both|default|passive]``

Runs every ``bench/bench_<family>.py``. Each allocator setting, each CPU SIMD level and each
OpenMP wait policy runs in its own subprocess (all are process-wide: the allocator setting cannot
be fully undone, the extension reads DLK_CPU_CAPABILITY when it loads, the OpenMP runtime reads
OMP_WAIT_POLICY when torch loads), then the results are merged into
``bench/results/<family>.{json,csv,png}`` and printed as a table.

``auto`` (``--cpu-capability``, ``--omp-wait``) is the family's choice where its module sets
``CPU_CAPABILITY_AUTO = "native"`` or ``OMP_WAIT_AUTO``, else the defaults below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (CI smoke test)")
    p.add_argument("--only", default=",".join(FAMILIES),
                   help=f"comma-separated families: {', '.join(FAMILIES)}")
    p.add_argument("--alloc", choices=["both", "default", "reuse"], default="both",
                   help="allocator settings to run (each in its own subprocess)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cpu-capability", default="auto",
                   help="CPU SIMD levels to run (default, avx2, avx512; comma-separated): 'auto' is the CPU's best "
                        "level, plus avx2 when that is avx512")
    p.add_argument("--omp-wait", choices=["auto", "both", "default", "passive"], default="auto",
                   help="OMP_WAIT_POLICY of the workers: 'default' leaves it unset (the OpenMP runtime's "
                        "default), 'passive' sets PASSIVE (idle threads sleep instead of spinning); 'auto': "
                        "the family's OMP_WAIT_AUTO (models: both), else default")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one family, one setting
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(args.only) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; have {FAMILIES}")
    args.cpu_capability_auto = args.cpu_capability == "auto"
    args.cpu_capability = _levels(args.cpu_capability, p)
    if args.worker and (args.alloc == "both" or args.omp_wait in ("auto", "both") or args.worker_out is None):
        p.error("--worker needs one --alloc setting, one --omp-wait setting and --worker-out")
    return args


def _levels(spec: str, p: argparse.ArgumentParser) -> list[str]:
    """The SIMD levels to run, each one the CPU supports (a higher one would fall back silently)."""
    from dlkernels import _backend

    if _backend._C is None:
        return ["none"]
    known = _backend.CPU_CAPABILITIES
    native = _backend._C.cpu.native_capability()
    if spec == "auto":
        return [native] + (["avx2"] if native == "avx512" else [])
    levels = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [lv for lv in levels if lv not in known or known.index(lv) > known.index(native)]
    if bad:
        p.error(f"--cpu-capability {bad}: this CPU runs {', '.join(known[:known.index(native) + 1])}")
    return levels


def _worker(args: argparse.Namespace) -> None:
    """One family under one allocator setting, in this (fresh) process; writes --worker-out."""
    if args.alloc == "reuse":  # first, so that every tensor of the run lives under it
        from dlkernels.cpu import reuse_large_allocations

        reuse_large_allocations(True)
    import torch
    from tqdm import tqdm

    from bench import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    family = args.worker
    cases = importlib.import_module(f"bench.bench_{family}").cases(args.quick, args.device)
    timing = harness.QUICK if args.quick else harness.Timing()
    records = []
    for case in tqdm(cases, desc=f"{family} [alloc={args.alloc}]", unit="case"):
        records += harness.run_case(case, timing, args.alloc, family, compile=not args.no_compile)
    try:
        from dlkernels.cpu import large_allocations_reused

        reused = large_allocations_reused()
    except Exception:
        reused = None
    machine = harness.machine_info(args.device)
    for r in records:
        r["simd"] = machine["dlkernels_simd"]
        r["omp_wait"] = args.omp_wait
    out = {"machine": machine, "records": records,
           "allocator": {"setting": args.alloc, "label": harness.ALLOC_LABELS[args.alloc],
                         "large_allocations_reused": reused}}
    args.worker_out.write_text(json.dumps(out, default=str))


def _family_auto(family: str, name: str) -> object:
    """A family module's ``name`` (e.g. OMP_WAIT_AUTO), read without importing the module (which
    may import torch and the package)."""
    import ast

    tree = ast.parse((HERE / f"bench_{family}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _settings(family: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The SIMD levels and OpenMP wait policies to run ``family`` under."""
    levels = args.cpu_capability
    if args.cpu_capability_auto and _family_auto(family, "CPU_CAPABILITY_AUTO") == "native":
        levels = levels[:1]  # 'auto' lists the CPU's best level first
    if args.omp_wait == "auto":
        omp = list(_family_auto(family, "OMP_WAIT_AUTO") or ["default"])
    else:
        omp = ["default", "passive"] if args.omp_wait == "both" else [args.omp_wait]
    return levels, omp


def _run_family(family: str, args: argparse.Namespace, allocs: list[str]) -> dict:
    """Run ``family`` once per allocator setting, SIMD level and OpenMP wait policy, each in a
    subprocess; merge the results."""
    levels, omps = _settings(family, args)
    merged: dict = {"family": family, "options": {"quick": args.quick, "compile": not args.no_compile,
                                                  "device": args.device, "threads": args.threads,
                                                  "cpu_capability": levels, "omp_wait": omps},
                    "allocators": {}, "machine": {}, "records": []}
    with tempfile.TemporaryDirectory() as tmp:
        for alloc in allocs:
            for level in levels:
                for omp in omps:
                    out = Path(tmp) / f"{alloc}-{level}-{omp}.json"
                    cmd = [sys.executable, "-m", "bench", "--worker", family, "--worker-out", str(out),
                           "--alloc", alloc, "--device", args.device, "--cpu-capability", level, "--omp-wait", omp]
                    cmd += ["--quick"] * args.quick + ["--no-compile"] * args.no_compile
                    if args.threads:
                        cmd += ["--threads", str(args.threads)]
                    env = dict(os.environ, DLK_CPU_CAPABILITY=level)
                    env.pop("OMP_WAIT_POLICY", None)  # "default": the OpenMP runtime's own
                    if omp == "passive":
                        env["OMP_WAIT_POLICY"] = "PASSIVE"
                    proc = subprocess.run(cmd, cwd=HERE.parent, env=env)
                    if proc.returncode != 0:
                        raise SystemExit(f"bench worker {family} [alloc={alloc}, simd={level}, omp={omp}] failed, "
                                         f"exit code {proc.returncode}")
                    part = json.loads(out.read_text())
                    merged["machine"] = part["machine"]
                    merged["allocators"][alloc] = part["allocator"]
                    merged["records"] += part["records"]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return 0
    from bench import harness

    allocs = list(harness.ALLOC_SETTINGS) if args.alloc == "both" else [args.alloc]
    failed = False
    everything: list[dict] = []
    for family in args.only:
        t0 = time.perf_counter()
        merged = _run_family(family, args, allocs)
        paths = harness.write_results(family, merged, args.out)
        m = merged["machine"]
        opts = merged["options"]
        print(f"\n== {family}: {m['cpu']}, {m['torch_threads']} threads (load {m['loadavg_1min']:.1f}), "
              f"torch {m['torch']}, dlkernels backend {m['dlkernels_backend']} "
              f"(SIMD levels run: {', '.join(opts['cpu_capability'])}; CPU's best: {m.get('cpu_native_simd')}), "
              f"OMP_WAIT_POLICY: {', '.join(opts['omp_wait'])}, git {m['git_revision']}")
        for alloc in allocs:
            print(f"   alloc={alloc}: {harness.ALLOC_LABELS[alloc]}")
        print(harness.table(merged["records"]))
        shares = harness.share_lines(merged["records"])
        if shares:
            print("share of torch eager's step in the layers dlkernels replaces (torch.profiler):")
            print("\n".join(shares))
        print(f"({time.perf_counter() - t0:.0f} s) wrote " + ", ".join(str(p) for p in paths))
        failed |= any("error" in r for r in merged["records"])
        everything += merged["records"]
    if len(args.only) > 1:  # the main job: one table over every family
        paths = harness.write_summary(everything, merged["machine"], args.out)
        print("\n== summary: dlkernels against torch eager, torch.compile, the roofline and the reference")
        print(harness.summary_table(harness.summary_rows(everything)))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

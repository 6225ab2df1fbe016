"""``python -m bench [--quick] [--only FAMILY[,FAMILY]] [--alloc both|default|reuse] [--no-compile]``

Runs every ``bench/bench_<family>.py``. Each allocator setting runs in its own subprocess (the
setting is process-wide and cannot be fully undone), then the results are merged into
``bench/results/<family>.{json,csv,png}`` and printed as a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one family, one setting
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(args.only) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; have {FAMILIES}")
    if args.worker and (args.alloc == "both" or args.worker_out is None):
        p.error("--worker needs one --alloc setting and --worker-out")
    return args


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
    out = {"machine": harness.machine_info(args.device), "records": records,
           "allocator": {"setting": args.alloc, "label": harness.ALLOC_LABELS[args.alloc],
                         "large_allocations_reused": reused}}
    args.worker_out.write_text(json.dumps(out, default=str))


def _run_family(family: str, args: argparse.Namespace, allocs: list[str]) -> dict:
    """Run ``family`` once per allocator setting, each in a subprocess; merge the results."""
    merged: dict = {"family": family, "options": {"quick": args.quick, "compile": not args.no_compile,
                                                  "device": args.device, "threads": args.threads},
                    "allocators": {}, "machine": {}, "records": []}
    with tempfile.TemporaryDirectory() as tmp:
        for alloc in allocs:
            out = Path(tmp) / f"{alloc}.json"
            cmd = [sys.executable, "-m", "bench", "--worker", family, "--worker-out", str(out),
                   "--alloc", alloc, "--device", args.device]
            cmd += ["--quick"] * args.quick + ["--no-compile"] * args.no_compile
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=HERE.parent)
            if proc.returncode != 0:
                raise SystemExit(f"bench worker {family} [alloc={alloc}] failed, exit code {proc.returncode}")
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
    for family in args.only:
        t0 = time.perf_counter()
        merged = _run_family(family, args, allocs)
        paths = harness.write_results(family, merged, args.out)
        m = merged["machine"]
        print(f"\n== {family}: {m['cpu']}, {m['torch_threads']} threads (load {m['loadavg_1min']:.1f}), "
              f"torch {m['torch']}, dlkernels backend {m['dlkernels_backend']} "
              f"(SIMD {m['dlkernels_simd']}), git {m['git_revision']}")
        for alloc in allocs:
            print(f"   alloc={alloc}: {harness.ALLOC_LABELS[alloc]}")
        print(harness.table(merged["records"]))
        print(f"({time.perf_counter() - t0:.0f} s) wrote " + ", ".join(str(p) for p in paths))
        failed |= any("error" in r for r in merged["records"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark harness shared by every ``bench/bench_<family>.py``.

A family module defines ``cases(quick: bool, device: str) -> list[Case]``. For each case the
harness measures, in the same process: the bandwidth of the access pattern the case matches (at
the case's size), then every contender (dlkernels, torch eager, torch.compile, ...). It reports
medians with their spread, speedups of each contender against the peers, and the roofline
fraction. ``python -m bench`` runs each allocator setting in its own subprocess and merges.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

ALLOC_SETTINGS = ("default", "reuse")
ALLOC_LABELS = {
    "default": "default glibc malloc (large blocks mmapped fresh)",
    "reuse": "large-block reuse (dlkernels.cpu.reuse_large_allocations)",
}
DLK, EAGER, COMPILE = "dlkernels", "torch eager", "torch.compile"
DLK_COMPILE = "dlkernels + torch.compile"  # dlkernels' modules under torch.compile (bench_models)
COMPILED = (COMPILE, DLK_COMPILE)  # the contenders --no-compile drops
PEERS = {"eager": EAGER, "compile": COMPILE}  # speedup columns: speedup_vs_<key>
# Access patterns probed, and the bytes each moves per byte of the tensor, as counted for its GB/s.
PATTERNS = {"read": 1, "copy": 2, "inplace": 2}


@dataclass
class Case:
    """One benchmark case.

    ``setup`` builds the inputs and returns name -> zero-argument callable; it runs only when the
    case runs, so big tensors of other cases are not alive meanwhile. ``min_bytes`` is what the
    algorithm must move at least; ``pattern`` names the probe in PATTERNS it is limited by, and
    ``size_bytes`` the tensor size at which that probe runs (normally the main input's).
    ``pattern=None``: no memory floor (e.g. a whole model's step), so no probe and no roofline.
    """

    name: str
    setup: Callable[[], dict[str, Callable[[], Any]]]
    min_bytes: int
    pattern: str | None
    size_bytes: int
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    # Several passes of different patterns (e.g. a read-only statistics pass, then a read-write
    # pass): pattern -> bytes. When given, the floor is the sum of each pass at its bandwidth and
    # min_bytes/pattern are derived from it.
    passes: dict[str, int] | None = None
    # Filled by ``setup`` (e.g. a profile of one contender); added to every record of the case.
    info: dict[str, Any] = field(default_factory=dict)
    # Per-case timing and number of interleaved turns, instead of the run's (slow cases: a few calls).
    timing: Timing | None = None
    rounds: int | None = None

    def __post_init__(self) -> None:
        if self.passes:
            self.min_bytes = sum(self.passes.values())
            self.pattern = "+".join(self.passes)
        if self.pattern is None:
            return
        for p in self.passes or {self.pattern: self.min_bytes}:
            if p not in PATTERNS:
                raise ValueError(f"{self.name}: pattern {p!r} is not one of {list(PATTERNS)}")

    def floor_s(self, bw: dict[str, float]) -> float:
        """The time the minimum traffic takes at the measured bandwidths (GB/s)."""
        return sum(b / (bw[p] * 1e9) for p, b in (self.passes or {self.pattern: self.min_bytes}).items())


@dataclass
class Timing:
    """How long to measure each contender (see time_fn)."""

    warmup: int = 3
    repeats: int = 30
    min_time: float = 0.5  # seconds; keep calling past `repeats` until this much time is measured
    max_calls: int = 2000


QUICK = Timing(warmup=2, repeats=10, min_time=0.05, max_calls=500)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any], *, warmup: int, repeats: int, min_time: float, max_calls: int = 2000,
    device: str = "cpu",
) -> list[float]:
    """Seconds per call of ``fn``: at least ``repeats`` calls and ``min_time`` seconds in all."""
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.startswith("cuda")
    times: list[float] = []
    gc.disable()  # a collection inside a timed call would be charged to that contender
    try:
        total, t_start = 0.0, time.perf_counter()
        while len(times) < repeats or (total < min_time and len(times) < max_calls):
            if cuda:  # events time the GPU work, not the launch
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            total = time.perf_counter() - t_start
    finally:
        gc.enable()
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and spread (quartiles, min, max) in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": ms[0], "max_ms": ms[-1], "calls": len(ms)}


def probes(size_bytes: int, device: str, patterns: Iterable[str]) -> dict[str, Callable[[], Any]]:
    """Callables whose speed is the bandwidth of each access pattern on a float32 tensor of
    ``size_bytes``, named "<pattern>/<op>": read: reductions (nothing written); copy:
    ``out.copy_(x)`` and ``torch.neg(x, out=out)`` into a preallocated buffer; inplace:
    ``x.mul_(1.0)``. A pattern's bandwidth is that of its fastest op."""
    n = max(size_bytes // 4, 1)
    x = torch.rand(n, device=device)
    out = torch.empty_like(x)
    ops = {"read": {"sum": x.sum, "amax": x.amax, "dot": partial(torch.dot, x, x)},
           "copy": {"copy_": partial(out.copy_, x), "neg": partial(torch.neg, x, out=out)},
           "inplace": {"mul_": partial(x.mul_, 1.0)}}
    return {f"{p}/{name}": fn for p in patterns for name, fn in ops[p].items()}


def with_compile(fns: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Add the torch.compile contender: inductor on the same torch code as "torch eager".

    ``dynamic=False``: every case is its own static-shape graph, as a training step would be.
    Compilation is lazy: it happens on the first call, which run_case times as first_call_s.
    """
    return {**fns, COMPILE: torch.compile(fns[EAGER], dynamic=False)}


def forward_backward(fn: Callable[..., Any], args: Iterable[Any], grad: torch.Tensor,
                     leaves: Iterable[torch.Tensor]) -> Callable[[], list[torch.Tensor | None]]:
    """Zero-argument callable: ``fn(*args).backward(grad)``, returning the leaves' gradients
    (for the error check against the reference; returning them costs nothing).

    The leaves' .grad are reset to None first, so backward writes fresh gradients instead of
    accumulating into old ones (which would add a read and a write per element).
    """
    args, leaves = tuple(args), tuple(leaves)

    def call() -> list[torch.Tensor | None]:
        for t in leaves:
            t.grad = None
        fn(*args).backward(grad)
        return [t.grad for t in leaves]
    return call


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def max_error(fn: Callable[[], Any]) -> float | None:
    """Max abs difference between what ``fn`` returns on dlkernels' automatic backend and on the
    plain-torch reference backend (the spec), the default generator seeded alike for both (so
    dropout draws the same seed); None when ``fn`` returns no tensors (an optimizer step)."""
    import dlkernels

    outs = []
    for backend in (None, "reference"):
        torch.manual_seed(0)
        if backend is None:
            got = fn()
        else:
            with dlkernels.use_backend(backend):
                got = fn()
        outs.append([t.detach().clone() for t in _tensors(got)])
    pairs = [(a, b) for a, b in zip(*outs, strict=True) if a.numel()]
    if not pairs:
        return None
    return max((a.double() - b.double()).abs().max().item() for a, b in pairs)


ROUNDS = 5  # contenders and probes are timed in turns: a slow drift of a shared machine hits all alike


def run_case(case: Case, timing: Timing, alloc: str, family: str,
             compile: bool = True) -> list[dict[str, Any]]:
    """Time the case's bandwidth probes and every contender, interleaved in ROUNDS turns (each
    turn a ROUNDS-th of ``timing``); one record per contender. The case's own ``timing`` and
    ``rounds``, when set, replace the run's."""
    timing = case.timing or timing
    rounds = case.rounds or ROUNDS
    if compile:
        torch._dynamo.reset()  # fresh compile cache per case: no recompile limit, no dynamic shapes
    base = {"family": family, "case": case.name, "alloc": alloc, **case.params,
            "min_bytes": case.min_bytes, "pattern": case.pattern}
    try:
        probe_fns = {} if case.pattern is None else probes(case.size_bytes, case.device,
                                                           case.passes or [case.pattern])
        contenders = case.setup()
    except Exception as e:  # the library may be mid-build: report it, keep going
        return [{**base, "contender": DLK, "error": f"setup: {type(e).__name__}: {e}"}]
    if not compile:
        for name in COMPILED:
            contenders.pop(name, None)
    records = {name: {**base, "contender": name} for name in contenders}
    for name, fn in contenders.items():
        try:
            t0 = time.perf_counter()
            fn()  # first call: compilation for torch.compile, lazy init for the others
            _sync(case.device)
            records[name]["first_call_s"] = time.perf_counter() - t0
        except Exception as e:
            records[name]["error"] = f"{type(e).__name__}: {e}"
    if DLK in contenders and "error" not in records[DLK]:
        try:
            records[DLK]["max_error"] = max_error(contenders[DLK])
        except Exception as e:  # a reference that cannot run this case: say so, keep timing
            records[DLK]["max_error_note"] = f"{type(e).__name__}: {e}"[:200]
    turn = Timing(warmup=1, repeats=-(-timing.repeats // rounds), min_time=timing.min_time / rounds,
                  max_calls=max(1, timing.max_calls // rounds))
    fns = {**probe_fns, **{k: f for k, f in contenders.items() if "error" not in records[k]}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if name in records and "error" in records[name]:
                continue
            warmup = timing.warmup if r == 0 else 1
            try:
                times[name] += time_fn(fn, device=case.device, **{**vars(turn), "warmup": warmup})
            except Exception as e:
                records[name]["error"] = f"{type(e).__name__}: {e}"
    floor_s = None
    if case.pattern is not None:
        n_bytes = max(case.size_bytes // 4, 1) * 4
        best = {p: min(statistics.median(t) for k, t in times.items() if k.startswith(p + "/"))
                for p in (case.passes or [case.pattern])}
        bws = {p: PATTERNS[p] * n_bytes / 1e9 / s for p, s in best.items()}
        floor_s = case.floor_s(bws)
    for name, rec in records.items():
        rec.update(case.info)
        if floor_s is not None:
            rec["pattern_gbps"] = case.min_bytes / floor_s / 1e9  # the effective bandwidth of the case's passes
        if "error" in rec:
            continue
        rec.update(summarize(times[name]), times_ms=[round(t * 1e3, 6) for t in times[name]])
        if floor_s is not None:
            sec = rec["median_ms"] / 1e3
            rec["gbps"] = case.min_bytes / sec / 1e9
            rec["roofline"] = floor_s / sec
    del contenders, probe_fns, fns
    gc.collect()  # once per case (a full collection takes ~0.3 s once inductor is loaded)
    medians = {r["contender"]: r["median_ms"] for r in records.values() if "median_ms" in r}
    for r in records.values():
        for key, peer in PEERS.items():
            if peer in medians and "median_ms" in r:
                r[f"speedup_vs_{key}"] = medians[peer] / r["median_ms"]
    return list(records.values())


# ---------------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "unknown (no commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str) -> dict[str, Any]:
    """Machine, software versions and the dlkernels build that ran, for the results file."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_revision": _git_revision(), "device": device,
        # other work on the machine skews timings (OpenMP threads then wait for a time slice)
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "dlk_backend_env": os.environ.get("DLK_BACKEND"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),  # read by the OpenMP runtime at load
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:  # guarded: the package may be mid-build
        import dlkernels
        info["dlkernels_backend"] = dlkernels._backend.select(torch.device(device))
    except Exception as e:
        info["dlkernels_backend"] = f"unknown ({type(e).__name__}: {e})"
    try:
        from dlkernels import _C
        info["dlkernels_simd"] = _C.cpu.capability()
        info["cpu_native_simd"] = _C.cpu.native_capability()
    except Exception:
        info["dlkernels_simd"] = None
    return info


# ---------------------------------------------------------------------------------- output

CSV_FIRST = ["family", "case", "alloc", "simd", "omp_wait", "contender", "median_ms", "iqr_ms", "q1_ms", "q3_ms",
             "min_ms", "max_ms", "calls", "gbps", "pattern", "pattern_gbps", "roofline", "speedup_vs_eager",
             "speedup_vs_compile", "first_call_s", "min_bytes"]


def write_results(family: str, merged: dict[str, Any], out_dir: Path = RESULTS) -> list[Path]:
    """Write <family>.json, .csv and .png; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{family}.{ext}" for ext in ("json", "csv", "png")]
    paths[0].write_text(json.dumps(merged, indent=1, default=str))
    records = merged["records"]
    keys = CSV_FIRST + sorted({k for r in records for k in r} - set(CSV_FIRST) - {"times_ms"})
    with paths[1].open("w", newline="") as f:  # raw times_ms stay in the JSON only
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in r.items()}
                    for r in records)
    plot(family, records, paths[2])
    return paths


def _several(records: list[dict[str, Any]], key: str) -> bool:
    return len({r.get(key) for r in records}) > 1


def _plot_label(records: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """A case's label in the plot: its name, and its SIMD level and OpenMP wait policy when
    several of them ran."""
    keys = [k for k in ("simd", "omp_wait") if _several(records, k)]
    return lambda r: r["case"] + "".join(f" [{r.get(k)}]" for k in keys)


# The bars of the plot: (contender, peer key in PEERS), each drawn where the records have it.
BARS = [(DLK, "eager"), (DLK, "compile"), (DLK_COMPILE, "compile")]


def plot(family: str, records: list[dict[str, Any]], path: Path) -> None:
    """Grouped horizontal bars: dlkernels' speedup vs each peer per case, a panel per allocator
    (and dlkernels under torch.compile against torch.compile, where it ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allocs = [a for a in ALLOC_SETTINGS if any(r["alloc"] == a for r in records)]
    label = _plot_label(records)
    cases = list(dict.fromkeys(label(r) for r in records))
    bars = [(c, k) for c, k in BARS if any(r["contender"] == c and f"speedup_vs_{k}" in r for r in records)]
    bars = bars or BARS[:2]
    fig, axes = plt.subplots(1, len(allocs), figsize=(6.5 * len(allocs), 0.45 * len(cases) + 1.8),
                             sharey=True, squeeze=False)
    height = 0.8 / len(bars)
    for ax, alloc in zip(axes[0], allocs, strict=True):
        for i, (contender, key) in enumerate(bars):
            recs = {label(r): r for r in records if r["alloc"] == alloc and r["contender"] == contender}
            vals = [recs.get(c, {}).get(f"speedup_vs_{key}", 0.0) for c in cases]
            ys = [j + (i - (len(bars) - 1) / 2) * height for j in range(len(cases))]
            name = "" if contender == DLK else f"{contender} "
            ax.barh(ys, vals, height=height, label=f"{name}vs {PEERS[key]}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(cases)), cases, fontsize=8)
        ax.set_xlabel("speedup of dlkernels (peer time / dlkernels time)")
        ax.set_title(f"allocator: {ALLOC_LABELS[alloc]}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].invert_yaxis()  # first case on top; the panels share (and so flip) one y axis
    fig.suptitle(f"{family}: dlkernels speedup (median of repeated runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of every record, grouped by allocator setting and case. The OpenMP wait
    policy is a column when several ran; the replaced layers' share when a case recorded one."""
    omp = _several(records, "omp_wait")
    share = any("share" in r for r in records)
    head = (["alloc", "simd"] + ["omp"] * omp
            + ["case", "contender", "median ms", "IQR ms", "GB/s", "roofline", "x eager", "x compile"]
            + ["share"] * share + ["compile s"])
    rows = []
    for r in records:
        lead = [r["alloc"], r.get("simd", "-")] + [r.get("omp_wait", "-")] * omp + [r["case"], r["contender"]]
        if "error" in r:
            rows.append(lead + ["ERROR: " + r["error"][:100]])
            continue
        rows.append(lead + [_fmt(r["median_ms"], ".3f"), _fmt(r["iqr_ms"], ".3f"), _fmt(r.get("gbps"), ".1f"),
                            _fmt(r.get("roofline"), ".0%"), _fmt(r.get("speedup_vs_eager"), ".2f"),
                            _fmt(r.get("speedup_vs_compile"), ".2f")]
                    + [_fmt(r.get("share"), ".0%")] * share
                    + [_fmt(r["first_call_s"], ".1f") if r["contender"] in COMPILED else ""])
    widths = [max(len(str(x[i])) for x in [head, *rows] if len(x) == len(head)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def share_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per (case, setting) that recorded ``share`` (bench_models): the part of torch
    eager's step spent in the layers dlkernels replaces, by kind, from torch.profiler."""
    seen: dict[tuple, str] = {}
    for r in records:
        if "share" not in r:
            continue
        key = (r["case"], r["alloc"], r.get("simd"), r.get("omp_wait"))
        kinds = ", ".join(f"{k.removeprefix('share_')} {v:.0%}" for k, v in r.items()
                          if k.startswith("share_"))
        seen.setdefault(key, f"  {r['case']} [alloc={r['alloc']}, simd={r.get('simd')}, omp={r.get('omp_wait')}]: "
                             f"{r['share']:.0%} ({kinds})")
    return list(seen.values())


# ---------------------------------------------------------------------------------- summary

SUMMARY_HEAD = ["family", "case", "alloc", "simd", "dlkernels ms", "x eager", "x compile", "roofline", "max err"]


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per dlkernels record: its time, ratios to the peers, roofline, error vs the reference."""
    rows = []
    for r in records:
        if r["contender"] != DLK:
            continue
        if "error" in r:
            rows.append([r["family"], r["case"], r["alloc"], r.get("simd") or "-", "ERROR", "-", "-", "-", "-"])
            continue
        rows.append([r["family"], r["case"], r["alloc"], r.get("simd") or "-", _fmt(r["median_ms"], ".3f"),
                     _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_compile"), ".2f"),
                     _fmt(r.get("roofline"), ".0%"), _fmt(r.get("max_error"), ".1e")])
    return rows


def summary_table(rows: list[list[str]], markdown: bool = False) -> str:
    """The summary rows as aligned text, or as a Markdown table (for the README)."""
    if markdown:
        lines = ["| " + " | ".join(SUMMARY_HEAD) + " |", "|" + "---|" * len(SUMMARY_HEAD)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x[i]) for x in [SUMMARY_HEAD, *rows]) for i in range(len(SUMMARY_HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [SUMMARY_HEAD, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_summary(records: list[dict[str, Any]], machine: dict[str, Any], out_dir: Path = RESULTS) -> list[Path]:
    """summary.md (machine, date, table), summary.csv and summary.png over every family that ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(records)
    md, csv_path, png = (out_dir / f"summary.{ext}" for ext in ("md", "csv", "png"))
    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    md.write_text(f"Measured {stamp} on {machine.get('cpu')} ({machine.get('torch_threads')} threads), torch "
                  f"{machine.get('torch')}, git {machine.get('git_revision')}. x eager / x compile: torch's time "
                  f"over dlkernels' (above 1: dlkernels is faster); roofline: the case's minimum traffic at the "
                  f"bandwidth probed in the same run; max err: largest abs difference to the plain-torch "
                  f"reference.\n\n{summary_table(rows, markdown=True)}\n")
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_HEAD)
        w.writerows(rows)
    _summary_plot([r for r in records if r["contender"] == DLK and "error" not in r], png)
    return [md, csv_path, png]


def _summary_plot(records: list[dict[str, Any]], path: Path) -> None:
    """dlkernels' speedup vs torch eager and vs torch.compile for every case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['family']}: {r['case']} [{r['alloc']}, {r.get('simd')}]" for r in records]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(records) + 1.6))
    height = 0.8 / len(PEERS)
    for i, (key, peer) in enumerate(PEERS.items()):
        vals = [r.get(f"speedup_vs_{key}") or float("nan") for r in records]
        ys = [j + (i - (len(PEERS) - 1) / 2) * height for j in range(len(records))]
        ax.barh(ys, vals, height=height, label=f"vs {peer}")
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(records)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of dlkernels (peer time / dlkernels time), log scale")
    ax.legend(fontsize=8)
    ax.set_title("dlkernels: every benchmark case")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``python -m bench.distributed [--quick] [--width N] [--layers N] [--rounds N]``

FSDP2 on 2 gloo ranks on the CPU: the optimizer step (``opt step``: gradient norm, clipping and
update, gradients fixed) and a whole training step (``train step``: zero_grad, forward, backward
with FSDP2's all-gather and reduce-scatter, step) of an MLP, for FusedAdam(max_grad_norm) against
torch.optim.Adam(fused=True) and Adam(foreach=True), each after ``clip_grad_norm_``. Prints a
table and writes ``bench/results/distributed.json``.

A script of its own, not a ``bench/bench_<family>.py`` case: the harness times a callable in one
process, while here two processes must run every call in lockstep (each step holds collectives),
and each contender needs its own sharded model. The contenders run in turns (``--rounds``), each
call starts after a barrier, and a call's time is the slower rank's. On 2 cores this measures
correctness of the collective's cost and the Python overhead, not scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MAX_NORM = 1.0
DLK, FUSED, FOREACH = "dlkernels FusedAdam", "torch Adam fused", "torch Adam foreach"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="a tiny model, few calls (smoke test)")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--layers", type=int, default=4, help="Linear layers (each fully_shard'ed)")
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--rounds", type=int, default=5, help="turns over the contenders")
    p.add_argument("--calls", type=int, default=20, help="timed calls per contender per turn")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.batch, args.rounds, args.calls = 64, 2, 8, 2, 3
    return args


def _model(width: int, layers: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    return fully_shard(model)


def _contenders(args: argparse.Namespace, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    from dlkernels.optim import FusedAdam

    out = {}
    for name in (DLK, FUSED, FOREACH):
        model = _model(args.width, args.layers)
        params = list(model.parameters())
        if name == DLK:
            opt = FusedAdam(params, lr=1e-4, max_grad_norm=MAX_NORM)

            def step(opt=opt) -> None:
                opt.step()
        else:
            opt = torch.optim.Adam(params, lr=1e-4, **({"fused": True} if name == FUSED else {"foreach": True}))

            def step(opt=opt, params=params) -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

        def train(model=model, opt=opt, step=step) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()
            step()

        train()  # gradients for "opt step", and the optimizers' state
        out[name] = {"opt step": step, "train step": train}
    return out


def _worker(rank: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    fns = _contenders(args, x)
    times: dict[tuple[str, str], list[float]] = {(c, n): [] for c, d in fns.items() for n in d}
    slowest = torch.zeros(1, dtype=torch.float64)
    for _ in range(args.rounds):
        for (contender, case), out in times.items():
            fn = fns[contender][case]
            fn()  # warm-up of this turn
            for _ in range(args.calls):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                slowest[0] = time.perf_counter() - t0
                dist.all_reduce(slowest, dist.ReduceOp.MAX)  # the step is as slow as its slower rank
                out.append(slowest.item())
    if rank == 0:
        Path(out_file).write_text(json.dumps([[c, n, t] for (c, n), t in times.items()]))
    dist.destroy_process_group()


def _summary(ts: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in ts)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": statistics.median(ms), "iqr_ms": q3 - q1, "min_ms": ms[0], "calls": len(ms)}


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    from bench import harness

    args = _parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "times.json")
        mp.spawn(_worker, args=(str(Path(tmp) / "store"), args, out_file), nprocs=2, join=True)
        raw = json.loads(Path(out_file).read_text())
    numel = args.layers * (args.width * args.width + args.width)
    records = [{"case": f"FSDP2 2 ranks {case}, MLP {args.layers}x{args.width} ({numel / 1e6:.1f}M params)",
                "step": case, "contender": c, **_summary(t), "times_ms": [round(x * 1e3, 4) for x in t]}
               for c, case, t in raw]
    medians = {(r["step"], r["contender"]): r["median_ms"] for r in records}
    for r in records:  # > 1: dlkernels is faster
        r["torch_fused_over_this"] = medians[(r["step"], FUSED)] / r["median_ms"]
    machine = harness.machine_info("cpu")
    machine["torch_threads"] = "1 per rank, 2 ranks"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "distributed.json"
    path.write_text(json.dumps({"family": "distributed", "options": {k: str(v) for k, v in vars(args).items()},
                                "machine": machine, "records": records}, indent=1))
    print(f"== distributed: {machine['cpu']}, torch {machine['torch']}, gloo, 2 ranks x 1 thread, "
          f"git {machine['git_revision']}")
    head = ["case", "contender", "median ms", "IQR ms", "torch fused / this"]
    rows = [[r["case"], r["contender"], f"{r['median_ms']:.3f}", f"{r['iqr_ms']:.3f}",
             f"{r['torch_fused_over_this']:.2f}"] for r in records]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]
    print("\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

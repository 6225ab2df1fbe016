"""Every bench case under pytest-benchmark, so two commits can be compared:

    pytest bench --benchmark-only --benchmark-autosave      # on the baseline commit
    pytest bench --benchmark-only --benchmark-compare       # on the new one

Quick sizes by default; ``DLK_BENCH_FULL=1`` runs the full sizes of ``python -m bench``. Each test is
one (case, contender) pair, grouped by case so the comparison table puts the contenders side by
side. ``python -m bench`` stays the main job (interleaved rounds, roofline, allocator settings).
"""

from __future__ import annotations

import importlib
import os

import pytest

from bench.__main__ import FAMILIES
from bench.harness import COMPILE, DLK, EAGER

QUICK = os.environ.get("DLK_BENCH_FULL", "0") != "1"
CONTENDERS = (DLK, EAGER, COMPILE)


def _cases() -> list:
    params = []
    for family in FAMILIES:
        for case in importlib.import_module(f"bench.bench_{family}").cases(QUICK, "cpu"):
            for contender in CONTENDERS:
                params.append(pytest.param(family, case, contender, id=f"{family}/{case.name}/{contender}"))
    return params


@pytest.mark.parametrize(("family", "case", "contender"), _cases())
def test_bench(benchmark, family, case, contender) -> None:
    import torch

    fns = case.setup()
    if contender not in fns:
        pytest.skip(f"{case.name} has no {contender} contender")
    if contender == COMPILE:
        torch._dynamo.reset()  # a static-shape graph per case, as python -m bench
    fn = fns[contender]
    benchmark.group = f"{family}: {case.name}"
    benchmark.extra_info.update(family=family, contender=contender, min_bytes=case.min_bytes, **case.params)
    # pedantic: one untimed warm-up call (compilation, lazy init), then fixed rounds of one call
    benchmark.pedantic(fn, warmup_rounds=1, rounds=10 if QUICK else 30, iterations=1)

"""Rung 2 of DESIGN.md's GPU ladder: every Triton kernel compiles to a real sm_80/sm_90 cubin
without a GPU, with no register spills. Run with ``-s`` to see the register table.

Runs in a process without TRITON_INTERPRET (with it, triton cannot compile ahead of time);
the interpreter tests run in a separate pytest process.
"""

import pytest

from triton_ops._aot import all_specs, compile_spec, interpreter_active

if interpreter_active():
    pytest.skip(
        "TRITON_INTERPRET is set: AOT compilation needs a separate pytest process without it", allow_module_level=True
    )

ARCHS = (80, 90)
SPECS = all_specs()
_rows: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _rows:
        print(f"\n{'kernel':36s} {'arch':>5s} {'regs':>5s} {'spills':>6s} {'shared':>7s} {'cubin':>7s}")
        for r in sorted(_rows, key=lambda r: (r["name"], r["arch"])):
            print(
                f"{r['name']:36s} {'sm_' + str(r['arch']):>5s} {r['n_regs']:5d} {r['n_spills']:6d} "
                f"{r['shared']:7d} {r['cubin_bytes']:7d}"
            )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_without_spills(spec, arch):
    r = compile_spec(spec, arch)
    _rows.append(r)
    assert r["cubin_bytes"] > 0
    assert 0 < r["n_regs"] <= 255
    assert r["n_spills"] == 0, f"{spec.name} sm_{arch}: {r['n_spills']} spilled registers"

"""qkv.bench fits the machine: GEMMs only for the dtypes used, bfloat16 skipped where it is
emulated, a usage error before anything is measured, every figure headed by its machine.

The timing itself is not asserted (no timed assertions in the suite); the real benchmark
run is in test_cli.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from qkv import bench


@pytest.fixture
def gemms(monkeypatch):
    """Record (dtype, n) of every GEMM measured; bfloat16 reads as emulated (1 GFLOP/s)."""
    seen = []

    def fake(dtype=torch.float32, n=2048, repeats=9, warmup=1.0):
        seen.append((dtype, n))
        return 1e9 if dtype == torch.bfloat16 else 100e9

    monkeypatch.setattr(bench, "gemm_throughput", fake)
    return seen


def test_only_without_a_match_is_a_usage_error_before_any_gemm(gemms, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        bench.main(["--quick", "--only", "no-such-case"])
    assert done.value.code == 2
    assert time.perf_counter() - t0 < 5  # a generous bound: nothing was measured
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only 'no-such-case' matches no case" in err[0]
    assert "'window 256'" in err[0] and "'decode call'" in err[0]  # the names to choose from
    assert gemms == []


def test_gemm_only_for_the_dtypes_of_the_selected_cases(gemms, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_case", lambda c, *a, **k: c)
    assert bench.main(["--quick", "--only", "decode call", "--no-memory"]) == 0
    assert [d for d, _ in gemms] == [torch.float32]
    out = capsys.readouterr().out
    assert "[1/3] decode call" in out and "[3/3] decode call, padding" in out  # progress
    assert "bfloat16" not in out


def test_emulated_bf16_cases_are_skipped_with_the_reason(gemms, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run_case", lambda c, *a, **k: ran.append(c.name) or c)
    assert bench.main(["--quick", "--only", "dense", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "dense bf16: bfloat16 matrix multiplies are emulated here (1.0 GFLOP/s" in out
    assert "dense bf16" not in ran and "dense" in ran
    assert torch.bfloat16 not in [d for d, n in gemms if n >= 1024]  # no large bf16 GEMM
    gemms.clear()
    ran.clear()
    assert bench.main(["--quick", "--only", "bf16", "--no-memory", "--bf16"]) == 0
    assert ran == ["dense bf16"] and [d for d, _ in gemms] == [torch.bfloat16]


def test_bf16_at_speed_is_measured(monkeypatch):
    monkeypatch.setattr(bench, "gemm_throughput", lambda dtype=None, *a, **k: 50e9)
    assert bench.bf16_emulated() is None


def test_the_header_names_the_machine():
    line = bench.machine_line()
    assert "cores" in line and "threads" in line and f"torch {torch.__version__}" in line
    assert "native kernel: " in line or "no native kernel (" in line


def test_decode_call_cases_compare_like_with_like():
    """qkv's padding case is timed against SDPA given the same (B, 1, 1, Tk) bool mask."""
    cases = {c.name: c for c in bench.suite(quick=True)}
    padding = cases["decode call, padding"]
    allowed = padding.allowed()
    assert allowed.shape == (4, 1, 1, 128) and allowed.dtype == torch.bool
    assert allowed[3, 0, 0].sum() == 1
    calls = bench._callables(padding)
    q, k, v = bench._inputs(padding, grad=False)
    torch.testing.assert_close(calls["qkv"](q, k, v), calls["sdpa-mask"](q, k, v))
    assert set(bench._callables(cases["decode call, causal"])) == {"qkv", "sdpa"}

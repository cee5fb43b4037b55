"""benchmarks/transformer_vs_rnn.py: the measurements docs/transformer-vs-rnn.md reports.

- the path-length gradient ∂y_T/∂x_1 by autograd equals central finite differences (tiny
  GRU and self-attention, float64), and vanishes with distance in a GRU, not in attention;
- a Conv1d equals attention with one head per kernel tap under a fixed position-only mask,
  and window attention with a position-only bias equals a depthwise convolution inside;
- the script runs end to end on tiny sizes and writes its results and figures.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transformer_vs_rnn.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("transformer_vs_rnn_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up there
    spec.loader.exec_module(module)
    return module


def finite_difference(forward, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """∂ forward(x)[0, -1] / ∂ x[0, 0] by central differences: (E_out, E)."""
    cols = []
    for e in range(x.shape[-1]):
        step = torch.zeros_like(x)
        step[0, 0, e] = eps
        with torch.no_grad():
            cols.append((forward(x + step)[0, -1] - forward(x - step)[0, -1]) / (2 * eps))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("name", ["GRU", "self-attention"])
def test_path_jacobian_equals_finite_differences(bench, name):
    forward = bench.path_models(4, 2, seed=3)[name]
    x = torch.randn(1, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = bench.jacobian_last_first(forward, x)
    assert jac.shape == (4, 4)
    torch.testing.assert_close(jac, finite_difference(forward, x), rtol=1e-6, atol=1e-8)
    assert float(jac.abs().max()) > 0


def test_gru_gradient_vanishes_with_distance_attention_does_not(bench):
    norms = bench.path_gradients([1, 32], E=8, heads=2, seeds=2)
    gru, attn = norms["GRU"], norms["self-attention"]
    assert gru[32] < 1e-4 * gru[1]  # a product of 32 contracting Jacobians
    assert attn[32] > 1e-2 * attn[1]  # one step: only diluted over 33 keys
    assert attn[32] > 1e3 * gru[32]


def test_conv1d_is_attention_with_fixed_position_only_weights(bench):
    torch.manual_seed(0)
    for K, bias in ((3, True), (5, False)):
        conv = nn.Conv1d(6, 4, K, padding=K // 2, bias=bias).double()
        x = torch.randn(2, 6, 11, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(bench.conv_as_attention(conv, x), conv(x))


def test_window_attention_with_position_bias_is_a_depthwise_convolution(bench):
    torch.manual_seed(1)
    B, T, E, K = 2, 12, 3, 5
    x = torch.randn(B, T, E, dtype=torch.float64)
    logits = torch.randn(K, dtype=torch.float64)
    kernel = torch.softmax(logits, 0)
    out = bench.smoothing_as_attention(x, logits)  # (B, T, E)
    for i in range(K // 2, T - K // 2):  # interior rows: the whole window is inside
        want = sum(kernel[m] * x[:, i + m - K // 2] for m in range(K))
        torch.testing.assert_close(out[:, i], want)
    # a border row renormalises over the keys it has: still a distribution, unlike zero padding
    torch.testing.assert_close(out[:, 0], (kernel[2:, None] * x[:, :3]).sum(1) / kernel[2:].sum())


def test_script_runs_and_writes_results_and_figures(bench, tmp_path, capsys):
    argv = ["--only", "conv", "paths", "steps", "--out", str(tmp_path), "--lengths", "8", "16",
            "--batch", "2", "--width", "8", "--heads", "2", "--rounds", "1", "--step-threads", "1", "--distances", "1",
            "3", "--path-width", "4", "--seeds", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["conv"]["conv_as_attention_max_error"] < 1e-12
    assert {r["layer"] for r in results["steps"]["rows"]} == {
        "self-attention", "GRU", "Conv1d (K=3)",
    }  # fmt: skip
    assert all(r["seconds"] > 0 for r in results["steps"]["rows"])
    for png in ("steps.png", "paths.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out

"""benchmarks/sqrt_dk.py, the √d_k table of docs/concepts.md: it runs, and its numbers
follow the formulas (std of q·k ≈ √D, scaled ≈ 1, entropy ≤ log T, the Jacobian norm's
closed form equals autograd's Jacobian)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sqrt_dk.py"


@pytest.fixture(scope="module")
def sqrt_dk():
    spec = importlib.util.spec_from_file_location("sqrt_dk_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_jacobian_norm_closed_form_equals_autograd(sqrt_dk):
    torch.manual_seed(0)
    for scores in (torch.randn(7, dtype=torch.float64), 30 * torch.randn(7, dtype=torch.float64)):
        jac = torch.autograd.functional.jacobian(lambda s: torch.softmax(s, -1), scores)  # (T, T)
        p = torch.softmax(scores, -1)
        torch.testing.assert_close(sqrt_dk.jacobian_norm(p), torch.linalg.norm(jac))
    assert float(sqrt_dk.jacobian_norm(torch.tensor([1.0, 0.0, 0.0]))) == 0.0  # one-hot


@pytest.mark.parametrize("D", [8, 128])
def test_rows_follow_the_formulas(sqrt_dk, D):
    keys, samples = 16, 400
    row = sqrt_dk.measure(D, keys=keys, samples=samples, seed=1)
    # std of q·k is sqrt(D): 6,400 samples give it within a few percent
    assert row.std_qk == pytest.approx(math.sqrt(D), rel=0.06)
    assert row.std_scaled == pytest.approx(1.0, rel=0.06)
    for entropy in (row.entropy, row.entropy_scaled):
        assert 0.0 <= entropy <= math.log(keys) + 1e-9
    for top in (row.max_weight, row.max_weight_scaled):
        assert 1.0 / keys <= top <= 1.0
    # unscaled scores saturate more: larger weights, lower entropy, more dead rows
    assert row.max_weight > row.max_weight_scaled and row.entropy < row.entropy_scaled
    assert row.dead >= row.dead_scaled
    # the scaled softmax does not depend on D: its numbers match those of another D
    other = sqrt_dk.measure(2 * D, keys=keys, samples=samples, seed=1)
    assert other.entropy_scaled == pytest.approx(row.entropy_scaled, abs=0.1)
    assert other.max_weight > row.max_weight


def test_script_prints_the_table(sqrt_dk, capsys, tmp_path):
    out = tmp_path / "rows.json"
    code = sqrt_dk.main(["--dims", "8", "32", "--samples", "50", "--keys", "8", "--json", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:] == [
        "8",
        "32",
    ]
    assert out.read_text(encoding="utf-8").count('"D"') == 2

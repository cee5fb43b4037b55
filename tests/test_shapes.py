"""`qkv shapes` at any size: arithmetic shapes equal torch's, huge sizes give numbers."""

from __future__ import annotations

import pytest

from qkv import cli
from qkv.demo.shapes import human_bytes, human_count, walk


@pytest.mark.parametrize(
    "B, L, E, H, G",
    [(2, 5, 64, 8, None), (1, 1, 4, 1, None), (3, 97, 48, 6, 2), (2, 7, 36, 4, 1)],
)
def test_arithmetic_shapes_equal_torchs(B, L, E, H, G):
    by_torch = walk(B, L, E, H, G, use_torch=True)
    by_hand = walk(B, L, E, H, G, use_torch=False)
    assert by_torch.by_torch and not by_hand.by_torch
    assert by_hand.steps == by_torch.steps  # shapes, FLOPs, bytes, views


def test_a_billion_positions_give_numbers(capsys):
    """torch cannot describe (1, 32, 1e9, 1e9) scores even on the meta device; the walk can."""
    L, E, H = 10**9, 4096, 32
    code = cli.main(["shapes", "--length", str(L), "--dim", str(E), "--heads", str(H)])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line}
    scores_bytes = 1 * H * L * L * 4  # float32
    assert f"({1}, {H}, {L}, {L})" in rows["scores"] and "111.0 EiB" in rows["scores"]
    assert f"{scores_bytes:,} bytes" in out
    D = E // H
    flops = (
        4 * (2 * L * E * E + L * E)  # four projections with biases
        + 2 * H * L * L * D * 2  # scores and weighted sum
        + 5 * H * L * L  # softmax
    )
    assert f"total: {flops:,} FLOPs" in out
    assert "shapes by arithmetic" in out


def test_a_dimension_beyond_int64_is_one_line(capsys):
    code = cli.main(["shapes", "--length", str(2**63), "--dim", "8", "--heads", "2"])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--length" in lines[0] and "2**63" in lines[0]


@pytest.mark.parametrize(
    "n, text",
    [(1536, "1.5 KiB"), (2**50, "1.0 PiB"), (3 * 2**60, "3.0 EiB"), (2**80, "1.0 YiB"),
     (2**90, "1024.0 YiB"), (100, "100 B")],
)  # fmt: skip
def test_human_bytes_up_to_yottabytes(n, text):
    assert human_bytes(n) == text


def test_human_count_units():
    assert human_count(12_300_000) == "12.3 M"
    assert human_count(8.2e21) == "8.2 Z" and human_count(1e18) == "1.0 E"

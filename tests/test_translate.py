"""`qkv translate`'s confidence and out-of-distribution warnings (qkv.demo.confidence).

One quick model trained here (a few seconds, bit-identical with one thread): wide enough to
get part of its held-out answers right, so that right and wrong answers can be compared.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from datetime import date
from pathlib import Path

import pytest
import torch

from qkv import cli
from qkv.demo import QUICK, save_checkpoint
from qkv.demo.confidence import (
    LOW_CONFIDENCE,
    MAX_INPUT_CHARS,
    heldout_confidences,
    input_warnings,
    longest_input,
    token_probabilities,
    translate_with_confidence,
)
from qkv.demo.dates import FIRST_DATE, FORMS, LAST_DATE
from qkv.demo.train import _encode_batch, build_model, prepare, train
from qkv.nn import beam_search, greedy

DOCS = Path(__file__).resolve().parents[1] / "docs" / "translate.md"
# QUICK with a wider model and more steps: about a third of the held-out answers right.
CONFIG = dataclasses.replace(
    QUICK, embed_dim=48, num_heads=3, num_encoder_layers=2, ffn_dim=96, steps=300,
    warmup_steps=30, threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, held-out examples, src, tgt, checkpoint path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set, heldout, src, tgt = prepare(CONFIG)
        model = train(CONFIG, train_set, src, tgt, progress=False).model
    finally:
        torch.set_num_threads(threads)
    path = save_checkpoint(tmp_path_factory.mktemp("translate") / "model.pt", model, src, tgt)
    return model, heldout, src, tgt, path


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- the confidence itself -----------------------------------------------------------------


@pytest.fixture(params=["trained", "rnn"])
def any_model(request, trained):
    """The trained Transformer, and an untrained GRU encoder-decoder (`--arch rnn`)."""
    if request.param == "trained":
        return trained[:4]
    _, heldout, src, tgt, _ = trained
    return build_model(dataclasses.replace(QUICK, arch="rnn"), src, tgt).eval(), heldout, src, tgt


def test_token_probabilities_equal_the_full_forward_pass(any_model):
    """Read through the decoding session = softmax of one teacher-forced forward pass."""
    model, heldout, src, tgt = any_model
    tokens = _encode_batch([ex.source for ex in heldout[:16]], src)  # (B, S)
    out = greedy(model, tokens, max_new_tokens=11)  # (B, 1 + n)
    got = token_probabilities(model, tokens, out)  # (B, n)
    with torch.no_grad():
        probs = torch.softmax(model(tokens, out[:, :-1]).double(), dim=-1)  # (B, n, V)
    chosen = probs.gather(-1, out[:, 1:, None])[..., 0]  # (B, n)
    is_eos = (out[:, 1:] == tgt.eos_id).long()  # (B, n)
    live = (torch.cumsum(is_eos, 1) - is_eos) == 0  # up to and including the end token
    truth = torch.where(live, chosen, torch.ones_like(chosen))  # 1 after the end token
    torch.testing.assert_close(got, truth, atol=1e-5, rtol=0)
    # greedy chose the most likely token at every step up to the end
    torch.testing.assert_close(got[live], probs.max(-1).values[live], atol=1e-5, rtol=0)


def test_beam_confidence_is_the_beam_score(trained):
    """With length_penalty 1 a beam's score is its mean log-probability per token."""
    model, heldout, src, tgt, _ = trained
    tokens = _encode_batch([ex.source for ex in heldout[:8]], src)
    result = beam_search(model, tokens, max_new_tokens=11, num_beams=3)
    probs = token_probabilities(model, tokens, result.tokens)  # (B, n)
    is_eos = (result.tokens[:, 1:] == tgt.eos_id).long()  # (B, n)
    before_end = (torch.cumsum(is_eos, 1) - is_eos) == 0
    n = before_end.sum(1).double()  # tokens up to and including the end token
    torch.testing.assert_close(probs.log().sum(1), result.scores * n, atol=1e-6, rtol=1e-6)


def test_wrong_heldout_answers_rank_below_right_ones(trained):
    model, heldout, src, tgt, _ = trained
    scored = heldout_confidences(model, heldout, src, tgt)
    right = [c for c, ok in scored if ok]
    wrong = [c for c, ok in scored if not ok]
    assert len(right) >= 20 and len(wrong) >= 20, (len(right), len(wrong))
    # the share of (wrong, right) pairs ordered wrong < right (the ROC AUC)
    auc = sum(w < r for w in wrong for r in right) / (len(wrong) * len(right))
    assert auc > 0.7, auc  # 0.79 with this model and seed
    median_right = sorted(right)[len(right) // 2]
    assert sum(w < median_right for w in wrong) > 0.7 * len(wrong)


def test_low_confidence_warning_follows_the_threshold(trained):
    model, heldout, src, tgt, _ = trained
    texts = [ex.source for ex in heldout[:40]]
    plain = translate_with_confidence(model, texts, src, tgt, threshold=0.0)
    assert all(t.warning is None for t in plain)  # held-out inputs are in distribution
    middle = sorted(t.confidence for t in plain)[20]
    marked = translate_with_confidence(model, texts, src, tgt, threshold=middle)
    for a, b in zip(plain, marked, strict=True):
        assert (a.output, a.confidence) == (b.output, b.confidence)
        assert (b.warning is not None) == (a.confidence < middle)
        assert b.warning is None or b.warning.startswith("low confidence")


def test_the_documented_threshold_is_the_one_used():
    text = DOCS.read_text(encoding="utf-8")
    stated = re.search(r"LOW_CONFIDENCE\s*=\s*([0-9.]+)", text)
    assert stated is not None and float(stated.group(1)) == LOW_CONFIDENCE


# ---- out of distribution -------------------------------------------------------------------


def test_task_inputs_raise_no_warning():
    """Every form of dates drawn from the whole range (not only the years the table covers)."""
    rng = random.Random(7)
    span = (LAST_DATE - FIRST_DATE).days
    days = [date.fromordinal(FIRST_DATE.toordinal() + rng.randrange(span + 1)) for _ in range(60)]
    texts = [form.render(d) for d in days for form in FORMS]
    assert max(len(t) for t in texts) <= longest_input()
    flagged = {t: w for t in texts if (w := input_warnings(t))}
    assert not flagged


@pytest.mark.parametrize(
    "text, needle",
    [
        ("hello", "no digit and no month name"),
        ("... --- ...", "no digit and no month name"),
        ("1" * 5000, "longer than any training input (29)"),
        ("7'''''''''", "stand where no training input has them"),
        ("9102 hcraM ht7", "never follow each other"),
        ("Mar,,,,,,,,,7", "never follow each other"),
    ],
)
def test_out_of_distribution_inputs_are_flagged(text, needle):
    assert any(needle in w for w in input_warnings(text))


# ---- qkv translate -------------------------------------------------------------------------


def test_translate_json_schema(trained, capsys):
    *_, path = trained
    texts = ["7 March 2019", "hello", "2019年3月7日"]
    code, out, err = run(["translate", *texts, "--checkpoint", str(path), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["input"] for r in rows] == texts
    for r in rows:
        assert set(r) == {"input", "output", "valid_date", "confidence", "warning"}
        assert isinstance(r["output"], str) and isinstance(r["valid_date"], bool)
        assert isinstance(r["confidence"], float) and 0.0 <= r["confidence"] <= 1.0
        assert r["warning"] is None or isinstance(r["warning"], str)
        assert r["valid_date"] == bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["output"])) and (
            not r["valid_date"] or date.fromisoformat(r["output"])
        )
    assert "no digit and no month name" in rows[1]["warning"]


def test_translate_prints_confidence_and_marks_warnings(trained, capsys):
    model, _, src, tgt, path = trained
    texts = ["7 March 2019", "1" * 1000, "hello"]
    code, out, err = run(["translate", *texts, "--checkpoint", str(path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(re.search(r"\d+\.\d% sure", line) for line in lines)
    assert len(lines[1]) < 400  # the long input is shown cut short
    assert "! warning:" in lines[1] and "longer than any training input" in lines[1]
    assert "! warning:" in lines[2] and "no digit" in lines[2]
    expected = translate_with_confidence(model, texts, src, tgt)
    for line, t in zip(lines, expected, strict=True):
        assert f"->  {t.output}" in line
        assert ("! warning:" in line) == (t.warning is not None)


@pytest.mark.parametrize("text, needle", [("", "TEXT is empty"), ("   ", "TEXT is blank"),
                                          ("7" * (MAX_INPUT_CHARS + 1), "TEXT has 10,001")])  # fmt: skip
def test_translate_refuses_empty_blank_and_huge_text(trained, text, needle, capsys):
    *_, path = trained
    code, out, err = run(["translate", text, "--checkpoint", str(path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and needle in lines[0]

"""The GRU encoder-decoder with additive attention (`qkv demo --arch rnn`).

- `qkv demo --arch rnn --quick` end to end: files, metrics keys, heatmaps, index.html, and
  `qkv translate` on its checkpoint (greedy and beam);
- its attention weights are distributions over the real source positions, 0 on padding,
  and a padded source gives the logits of the unpadded one;
- step-by-step decoding with its state (`RNNState`) equals the teacher-forced pass, and beam
  search with one beam equals greedy, through qkv.nn.generate;
- the checkpoint round trip, training-state resume bit for bit, and clear errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from qkv import cli
from qkv.demo import QUICK, DemoConfig, load_checkpoint, load_train_state, save_checkpoint
from qkv.demo.checkpoint import CheckpointError
from qkv.demo.rnn import RNNConfig, RNNEncoderDecoder, RNNState
from qkv.demo.train import build_model, prepare, train, translate
from qkv.nn import beam_search, greedy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dataclasses.replace(QUICK, arch="rnn", train_examples=1_000, eval_examples=20, steps=6,
                           heatmap_examples=1)  # fmt: skip


def tiny_model(seed: int = 0) -> RNNEncoderDecoder:
    torch.manual_seed(seed)
    return RNNEncoderDecoder(RNNConfig(src_vocab_size=11, tgt_vocab_size=7, embed_dim=8,
                                       hidden_dim=12)).eval()  # fmt: skip


@pytest.fixture(scope="module")
def rnn_dir(tmp_path_factory):
    """One `qkv demo --arch rnn --quick` run shared by the tests below (a few seconds)."""
    out = tmp_path_factory.mktemp("rnn")
    assert cli.main(["demo", "--arch", "rnn", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_rnn_quick_writes_metrics_checkpoint_heatmaps_and_index(rnn_dir):
    metrics = json.loads((rnn_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["arch"] == "rnn"
    for key in ("exact_match", "train_seconds", "parameters", "eval_examples", "history"):
        assert key in metrics
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["train_seconds"] > 0
    assert metrics["config"]["model"]["hidden_dim"] == QUICK.rnn_hidden
    ckpt = load_checkpoint(rnn_dir / metrics["checkpoint"])
    assert isinstance(ckpt.model, RNNEncoderDecoder) and not ckpt.model.training
    assert metrics["parameters"] == sum(p.numel() for p in ckpt.model.parameters())
    assert len(metrics["heatmaps"]) == QUICK.heatmap_examples
    index = (rnn_dir / "index.html").read_text(encoding="utf-8")
    for figure in metrics["heatmaps"]:
        assert figure["decoder_self"] is None  # an RNN decoder has no self-attention
        png = rnn_dir / figure["cross"]
        assert png.read_bytes().startswith(PNG_SIGNATURE)
        assert figure["cross"] in index
    assert "GRU encoder-decoder" in index
    assert load_train_state(rnn_dir / "train_state.pt").step == QUICK.steps


@pytest.mark.parametrize("beam", ["1", "3"])
def test_translate_reads_the_rnn_checkpoint(rnn_dir, capsys, beam):
    texts = ["7 March 2019", "2019年3月7日"]
    argv = ["translate", *texts, "--checkpoint", str(rnn_dir / "model.pt"), "--beam", beam]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("->" in line for line in lines)


def test_attention_weights_are_distributions_over_the_real_source():
    model = tiny_model()
    lengths = [6, 3, 1]
    src = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, 11, (n,))
    tgt = torch.randint(1, 7, (3, 5))
    logits, weights = model.decode(tgt, model.encode(src), need_weights=True)
    assert logits.shape == (3, 5, 7) and weights.shape == (3, 5, 6)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    for b, n in enumerate(lengths):
        assert bool((weights[b, :, n:] == 0).all())  # padding gets exactly 0
        # the padded row gives what the row alone, unpadded, gives
        alone, w_alone = model.decode(tgt[b : b + 1], model.encode(src[b : b + 1, :n]),
                                      need_weights=True)  # fmt: skip
        torch.testing.assert_close(logits[b : b + 1], alone)
        torch.testing.assert_close(weights[b : b + 1, :, :n], w_alone)


def test_stepwise_decoding_with_its_state_equals_the_teacher_forced_pass():
    model = tiny_model(1)
    src = torch.randint(3, 11, (2, 5))
    tgt = torch.randint(1, 7, (2, 6))
    encoded = model.encode(src)
    full = model.decode(tgt, encoded)  # (B, T, V)
    cache = model.new_cache()
    assert isinstance(cache, RNNState) and len(cache) == 0
    pieces = [model.decode(tgt[:, :2], encoded, cache=cache)]
    pieces += [model.decode(tgt[:, t : t + 1], encoded, cache=cache) for t in range(2, 6)]
    assert len(cache) == 6
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    with pytest.raises(ValueError, match="another model"):
        tiny_model().decode(tgt[:, :1], encoded, cache=cache)


def test_greedy_and_beam_search_run_the_rnn_as_they_run_the_transformer():
    model = tiny_model(2)
    src = torch.randint(3, 11, (3, 4))
    out = greedy(model, src, max_new_tokens=5)
    assert out.shape[0] == 3 and bool((out[:, 0] == model.config.bos_id).all())
    beam1 = beam_search(model, src, max_new_tokens=5, num_beams=1)
    torch.testing.assert_close(beam1.tokens, out)
    # greedy picks the argmax of the teacher-forced logits of its own output, step by step
    logits = model(src, out[:, :-1])
    ended = torch.zeros(3, dtype=torch.bool)
    for t in range(out.shape[1] - 1):
        pick = logits[:, t].argmax(-1)
        expect = torch.where(ended, torch.full_like(pick, model.config.pad_id), pick)
        assert torch.equal(out[:, t + 1], expect)
        ended |= pick == model.config.eos_id
    beam4 = beam_search(model, src, max_new_tokens=5, num_beams=4)
    assert beam4.tokens.shape[0] == 3 and bool(torch.isfinite(beam4.scores).all())


def test_checkpoint_round_trip_and_errors(tmp_path):
    _, _, src, tgt = prepare(TINY)
    model = build_model(TINY, src, tgt).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, src, tgt)
    loaded = load_checkpoint(path).model
    assert isinstance(loaded, RNNEncoderDecoder)
    texts = ["7 March 2019", "March 7, 2019"]
    assert translate(loaded, texts, src, tgt) == translate(model, texts, src, tgt)
    data = torch.load(path, weights_only=True)
    torch.save({**data, "arch": "lstm"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="arch 'lstm'"):
        load_checkpoint(tmp_path / "bad.pt")
    state = dict(data["state_dict"])
    state["cell.weight_hh"] = state["cell.weight_hh"][:, :-1]
    torch.save({**data, "state_dict": state}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"cell\.weight_hh"):
        load_checkpoint(tmp_path / "shape.pt")


def test_resume_continues_the_rnn_bit_for_bit(tmp_path):
    train_set, _, src, tgt = prepare(TINY)
    state, midway = tmp_path / "state.pt", tmp_path / "midway.pt"

    def keep_midway(step, seconds, model):  # the periodic save of step 3 has just been written
        if step == 3:
            shutil.copy(state, midway)

    straight = train(TINY, train_set, src, tgt, progress=False, state_path=state,
                     checkpoint_every=3, on_step=keep_midway)  # fmt: skip
    with pytest.raises(CheckpointError, match="arch"):  # a Transformer run cannot resume it
        train(dataclasses.replace(TINY, arch="transformer"), train_set, src, tgt,
              progress=False, resume=load_train_state(midway))  # fmt: skip
    resumed = train(TINY, train_set, src, tgt, progress=False, resume=load_train_state(midway))
    assert resumed.resumed_from == 3
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_on_step_sees_every_step_and_is_not_training_time():
    train_set, _, src, tgt = prepare(TINY)
    seen = []
    result = train(TINY, train_set, src, tgt, progress=False,
                   on_step=lambda step, seconds, model: seen.append((step, seconds, model.training)))  # fmt: skip
    assert [(s, training) for s, _, training in seen] == [(s, True) for s in range(1, 7)]
    seconds = [t for _, t, _ in seen]
    assert seconds == sorted(seconds) and seconds[-1] == result.seconds
    assert math.isfinite(result.final_loss)


def test_bad_options_are_clear(capsys):
    with pytest.raises(ValueError, match="arch"):
        DemoConfig(arch="lstm")
    with pytest.raises(ValueError, match="even"):
        RNNConfig(src_vocab_size=5, tgt_vocab_size=5, hidden_dim=7)
    with pytest.raises(TypeError, match="RNNConfig"):
        RNNEncoderDecoder(DemoConfig())
    assert cli.main(["demo", "--arch", "lstm"]) == 2
    err = capsys.readouterr().err
    assert "--arch" in err and "Traceback" not in err

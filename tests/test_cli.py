"""The `qkv` command line: demo end to end, translate, shapes, bench, usage errors, and
the demo checkpoint (atomic writes, clear errors for bad files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from qkv import cli
from qkv.demo import checkpoint as ckpt_module
from qkv.demo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """cli.main(argv) -> (exit code, stdout, stderr)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One quick demo run shared by the tests below (a few seconds)."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread setting is undone
    return out


# ---- qkv demo ----------------------------------------------------------------------------


def test_demo_writes_metrics_checkpoint_heatmaps_and_index(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text(encoding="utf-8"))
    for key in ("exact_match", "train_seconds", "parameters", "config", "eval_examples"):
        assert key in metrics
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert metrics["train_seconds"] > 0 and metrics["parameters"] > 0
    assert metrics["config"]["model"]["embed_dim"] == metrics["config"]["demo"]["embed_dim"]
    assert metrics["checkpoint"] == "model.pt" and (demo_dir / "model.pt").is_file()
    assert not list(demo_dir.glob(".*.tmp"))  # no temporary files left behind


def test_demo_heatmaps_are_valid_pngs_shown_by_index(demo_dir):
    import matplotlib.image

    pngs = sorted((demo_dir / "heatmaps").glob("*.png"))
    assert any("cross" in p.name for p in pngs) and any("decoder_self" in p.name for p in pngs)
    index = (demo_dir / "index.html").read_text(encoding="utf-8")
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
        assert f'src="heatmaps/{png.name}"' in index


def test_attention_maps_have_one_row_per_output_character(demo_dir):
    from qkv.demo.heatmaps import collect_attention

    ckpt = load_checkpoint(demo_dir / "model.pt")
    maps = collect_attention(ckpt.model, "7 March 2019", "2019-03-07", ckpt.src_vocab,
                             ckpt.tgt_vocab)  # fmt: skip
    H = ckpt.model.config.num_heads
    assert len(maps.cross) == ckpt.model.config.num_decoder_layers
    assert maps.cross[0].shape == (H, 11, len("7 March 2019") + 1)  # (H, T, S): chars + EOS
    assert maps.decoder_self[0].shape == (H, 11, 11)
    assert torch.allclose(maps.cross[0].sum(-1), torch.ones(H, 11), atol=1e-5)
    assert (maps.decoder_self[0].triu(1) == 0).all()  # causal
    assert maps.predicted[-1] == "<eos>" and maps.decoder_in[0] == "<bos>"


def test_thread_chooser_keeps_the_faster_count():
    from qkv.demo.train import ThreadChooser

    chooser = ThreadChooser([1, 2], probe=3, every=10)
    used = []
    for step in range(20):
        threads = chooser.threads_for(step)
        used.append(threads)
        slow = 5.0 if threads == 2 else 1.0  # two threads are 5x slower on a busy machine
        chooser.record(step, threads, slow if step % 3 else 100.0)  # first of each: warm-up
    assert used[:6] == [1, 1, 1, 2, 2, 2] and set(used[6:10]) == {1}
    assert chooser.choices == [(6, 1), (16, 1)]
    fixed = ThreadChooser([2])
    assert {fixed.threads_for(s) for s in range(500)} == {2} and fixed.choices == []


# ---- qkv translate -----------------------------------------------------------------------


def test_translate_prints_one_line_per_input(demo_dir, capsys):
    texts = ["21 November 2026", "2019年3月7日", "Tuesday, February 3, 1981"]
    code, out, err = run(["translate", *texts, "--checkpoint", str(demo_dir / "model.pt")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for text, line in zip(texts, lines, strict=True):
        assert line.startswith(text) and "->" in line
    code, out, _ = run(["translate", "7.3.2019", "--checkpoint", str(demo_dir / "model.pt"),
                        "--beam", "3"], capsys)  # fmt: skip
    assert code == 0 and len(out.splitlines()) == 1


def test_translate_unseen_characters_exit_2_with_one_line(demo_dir, capsys):
    code, out, err = run(["translate", "7 Mar 2019", "7 März 2019€", "--checkpoint",
                          str(demo_dir / "model.pt")], capsys)  # fmt: skip
    assert code == 2 and out == ""
    line = one_line_error(err)
    assert "never seen" in line and "'ä'" in line and "'€'" in line


def test_translate_missing_or_corrupt_checkpoint(tmp_path, demo_dir, capsys):
    code, _, err = run(["translate", "7 Mar 2019", "--checkpoint", str(tmp_path / "no.pt")], capsys)
    assert code == 2 and "no checkpoint at" in one_line_error(err)

    truncated = tmp_path / "truncated.pt"
    data = (demo_dir / "model.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = run(["translate", "7 Mar 2019", "--checkpoint", str(truncated)], capsys)
    assert code == 2 and "truncated or corrupt" in one_line_error(err)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, _, err = run(["translate", "7 Mar 2019", "--checkpoint", str(foreign)], capsys)
    assert code == 2 and "not a qkv demo checkpoint" in one_line_error(err)


# ---- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip(demo_dir, tmp_path):
    ckpt = load_checkpoint(demo_dir / "model.pt")
    path = save_checkpoint(tmp_path / "copy.pt", ckpt.model, ckpt.src_vocab, ckpt.tgt_vocab,
                           meta={"note": "copy"})  # fmt: skip
    again = load_checkpoint(path)
    assert again.meta == {"note": "copy"} and again.src_vocab == ckpt.src_vocab
    for (name, a), (_, b) in zip(ckpt.model.state_dict().items(),
                                 again.model.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert not again.model.training


def test_checkpoint_write_is_atomic(demo_dir, tmp_path, monkeypatch):
    ckpt = load_checkpoint(demo_dir / "model.pt")
    path = save_checkpoint(tmp_path / "model.pt", ckpt.model, ckpt.src_vocab, ckpt.tgt_vocab)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # the process "dies" mid-write
        raise OSError("simulated: disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, ckpt.model, ckpt.src_vocab, ckpt.tgt_vocab)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
    load_checkpoint(path)


def test_checkpoint_errors_are_clear(demo_dir, tmp_path):
    data = (demo_dir / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    payload = torch.load(demo_dir / "model.pt", weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "new.pt")
    bad = {**payload, "model_config": {**payload["model_config"], "ffn_dim": 7}}
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "shape.pt")


# ---- qkv shapes --------------------------------------------------------------------------


def test_shapes_walks_the_documented_tuples(capsys):
    code, out, _ = run(["shapes", "--batch", "2", "--length", "5", "--dim", "64", "--heads", "8"],
                       capsys)  # fmt: skip
    assert code == 0
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()
            if line.strip()}  # fmt: skip
    assert "(2, 5, 64)" in rows["input x"]
    assert "(2, 8, 5, 8)" in rows["split q"]
    assert "(2, 8, 5, 5)" in rows["scores s"]
    assert "(2, 8, 5, 8)" in rows["weighted sum"]
    assert "(2, 5, 64)" in rows["merge heads"]
    assert "6.4 K" in rows["scores s"]  # 2·B·H·L²·D = 2·2·8·25·8 FLOPs
    assert "1.6 KiB" in rows["scores s"]  # 2·8·5·5 floats of 4 bytes
    assert "Why heads split the feature axis" in out
    assert "same cost" in out and "6,400 FLOPs" in out


def test_shapes_grouped_query_and_dtype(capsys):
    code, out, _ = run(["shapes", "--batch", "2", "--length", "5", "--dim", "64", "--heads", "8",
                        "--kv-heads", "2", "--dtype", "bfloat16"], capsys)  # fmt: skip
    assert code == 0
    assert "(2, 2, 5, 8)" in out and "(2, 8, 5, 5)" in out and "2 bytes" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dim", "65", "--heads", "8"], "divisible by --heads"),
        (["--dim", "64", "--heads", "8", "--kv-heads", "3"], "divisible by --kv-heads"),
        (["--dim", "64", "--heads", "0"], "positive integer"),
        (["--dim", "-64", "--heads", "8"], "positive integer"),
        (["--dim", "sixty", "--heads", "8"], "positive integer"),
        (["--dim", "64", "--heads", "8", "--dtype", "int8"], "invalid choice"),
    ],
)
def test_shapes_validation_exits_2_with_one_line(args, needle, capsys):
    code, out, err = run(["shapes", "--batch", "2", "--length", "5", *args], capsys)
    assert code == 2 and out == ""
    assert needle in one_line_error(err)


# ---- usage errors, help, bench, python -m qkv ----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["demo", "--bogus"], ["demo", "--seed", "-1"], ["demo", "--steps", "0"],
     ["translate", "7 Mar 2019"], ["translate"],
     ["translate", "x", "--checkpoint", "m.pt", "--beam", "0"], ["shapes", "--batch", "2"]],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "error" in one_line_error(err)


def test_help_exits_0(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("demo", "translate", "shapes", "bench"):
        assert command in out


def test_bench_delegates_to_qkv_bench(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("qkv.bench")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "qkv.bench", fake)
    assert cli.main(["bench", "--quick", "--out", "somewhere"]) == 0
    assert seen == [["--quick", "--out", "somewhere"]]


def test_bench_missing_gives_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qkv.bench", None)  # as if the file did not exist
    code, _, err = run(["bench", "--quick"], capsys)
    assert code == 2 and "qkv.bench is not available" in one_line_error(err)


def test_python_dash_m_qkv():
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    args = ["shapes", "--batch", "2", "--length", "5", "--dim", "64", "--heads", "8"]
    done = subprocess.run([sys.executable, "-m", "qkv", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(2, 8, 5, 5)" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "qkv", "shapes", "--batch", "2"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_bench_writes_table_results_and_plot(tmp_path, capsys):
    """The real qkv.bench: one small case, then the length sweep and its plot."""
    import json as _json

    from qkv import bench

    assert bench.main(["--quick", "--repeats", "1", "--only", "decode Tq=1, window",
                       "--out", str(tmp_path)]) == 0  # fmt: skip
    assert "| decode Tq=1, window |" in (tmp_path / "table.md").read_text()
    results = _json.loads((tmp_path / "results.json").read_text())
    for contender in ("qkv", "sdpa-mask"):  # measured in a fresh process each
        assert results["decode Tq=1, window"][contender]["peak_mib"] >= 0
    assert set(results["sweeps"]) == {"causal", "window 256"}
    assert {"qkv", "sdpa"} <= set(results["sweeps"]["causal"])
    png = (tmp_path / "time_vs_length.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_peak_memory_sees_the_score_matrix():
    """naive attention holds (B, H, T, T) scores; torch's fused kernel never does."""
    from qkv import bench

    case = next(c for c in bench.suite(quick=True) if c.name == "dense")
    scores_mib = case.B * case.H * case.Tq * case.Tk * 4 / 2**20  # float32 scores
    naive = bench.peak_memory("dense", "naive", quick=True)
    fused = bench.peak_memory("dense", "qkv", quick=True)
    assert naive is not None and fused is not None
    assert naive - fused >= scores_mib  # first calls allocate a few MiB either way

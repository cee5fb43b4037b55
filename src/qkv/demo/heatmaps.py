"""Attention heatmaps of the trained demo model, and the index.html that shows them.

Letters: L decoder layers, H heads, S source positions (characters + EOS), T decoder
positions (BOS + the 10 characters of the translation).

`collect_attention` runs the model once, teacher-forced on its own translation, and asks
every attention module for its weights: a forward pre-hook adds `need_weights=True` to the
module's call and a forward hook takes the weights off its result, so the model's layers run
exactly as in training and nothing of them is re-implemented here. Row t of a decoder map is
the position that predicts output character t (the 11th row predicts <eos>).

The GRU encoder-decoder (`qkv.demo.rnn`, `qkv demo --arch rnn`) has one attention, the
additive attention its decoder computes before each step: its maps are one "layer" with one
"head", (1, T, S), and it has no decoder self-attention.

Chinese characters need a CJK font, which matplotlib often lacks: then their tick labels are
transliterated ([yr], [7], ...) and index.html shows the original text beside the figure.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..nn import MultiHeadAttention, Transformer
from .dates import Example, Vocab
from .rnn import RNNEncoderDecoder

__all__ = ["AttentionMaps", "collect_attention", "plot_attention", "write_heatmaps", "write_index"]

_CJK_FALLBACK = {
    **{d: f"[{i}]" for i, d in enumerate("〇一二三四五六七八九")},
    "十": "[10]", "年": "[yr]", "月": "[mo]", "日": "[day]", "星": "[xing]", "期": "[qi]",
}  # fmt: skip


@dataclass(frozen=True)
class AttentionMaps:
    """Per-layer attention weights of one translation, with the labels of their axes."""

    source: list[str]  # S column labels of cross-attention: the input characters, <eos>
    decoder_in: list[str]  # T decoder inputs: <bos> and the output characters
    predicted: list[str]  # T: what each decoder position predicts (output chars, <eos>)
    cross: list[torch.Tensor]  # L tensors (H, T, S)
    decoder_self: list[torch.Tensor]  # L tensors (H, T, T); none for the RNN


def _capture(module: MultiHeadAttention, store: list[torch.Tensor]) -> list:
    def ask_for_weights(mod, args, kwargs):
        return args, {**kwargs, "need_weights": True}

    def keep_weights(mod, args, kwargs, output):
        out, weights = output  # (B, Tq, E), (B, H, Tq, Tk)
        store.append(weights[0].detach().float().clone())  # (H, Tq, Tk)
        return out

    return [
        module.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
        module.register_forward_hook(keep_weights, with_kwargs=True),
    ]


def _capture_decoder(model: Transformer, cross: list, dec_self: list) -> list:
    handles = []
    for layer in model.decoder.layers:
        handles += _capture(layer.self_attn, dec_self)
        handles += _capture(layer.cross_attn, cross)
    return handles


@torch.no_grad()
def collect_attention(
    model: Transformer | RNNEncoderDecoder, source: str, translation: str, src: Vocab, tgt: Vocab
) -> AttentionMaps:
    """Weights of every decoder layer while the model reads `source` and writes `translation`."""
    model.eval()
    src_ids = torch.tensor([src.encode(source, eos=True)])  # (1, S)
    tgt_ids = torch.tensor([tgt.encode(translation, bos=True, strict=False)])  # (1, T)
    cross: list[torch.Tensor] = []
    dec_self: list[torch.Tensor] = []
    handles = []
    if isinstance(model, RNNEncoderDecoder):
        _, weights = model.decode(tgt_ids, model.encode(src_ids), need_weights=True)  # (1, T, S)
        cross.append(weights.detach().float().clone())  # (H=1, T, S)
    else:
        handles = _capture_decoder(model, cross, dec_self)
    try:
        if handles:
            model(src_ids, tgt_ids)
    finally:
        for h in handles:
            h.remove()
    chars = list(translation)
    return AttentionMaps(
        source=[*source, "<eos>"], decoder_in=["<bos>", *chars], predicted=[*chars, "<eos>"],
        cross=cross, decoder_self=dec_self,
    )  # fmt: skip


@cache
def _cjk_font() -> str | None:
    """A font family that has CJK glyphs, if matplotlib can find one."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    for entry in font_manager.fontManager.ttflist:
        if "last resort" in entry.name.lower():  # placeholder boxes for every character
            continue
        try:
            if ord("年") in FT2Font(entry.fname).get_charmap():
                return entry.name
        except (OSError, RuntimeError, ValueError):
            continue
    return None


def _drawable(text: str) -> str:
    """`text` with CJK characters transliterated when no CJK font is available."""
    if _cjk_font() is not None:
        return text
    return "".join(_CJK_FALLBACK.get(c, f"U+{ord(c):04X}") if ord(c) > 0x2E80 else c for c in text)


def _label(token: str) -> str:
    """A tick label: a visible space, special tokens as they are, CJK drawable."""
    return "␣" if token == " " else token if token.startswith("<") else _drawable(token)


def plot_attention(
    maps: Sequence[torch.Tensor],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    path: str | os.PathLike,
) -> Path:
    """One panel per layer and head, plus each layer's mean over heads (when H > 1); maps are
    (H, R, C).

    The panels are placed by hand (in inches) rather than by a layout engine, which would
    measure every tick label several times: this keeps a figure well under a second.
    """
    from matplotlib.figure import Figure

    L, (H, R, C) = len(maps), maps[0].shape
    panels = H + 1 if H > 1 else 1
    cell, gap, left, right, top, title_h, xlabels = 0.24, 0.2, 0.75, 1.0, 0.45, 0.3, 0.7
    panel_w, panel_h = C * cell, R * cell
    width = left + panels * panel_w + (panels - 1) * gap + right
    height = top + L * (title_h + panel_h + xlabels)
    fig = Figure(figsize=(width, height))
    family = _cjk_font()  # fonts are set per label: no global rcParams are touched
    font = {"family": [family, "DejaVu Sans"]} if family else {}
    xticks, yticks = [_label(c) for c in cols], [_label(r) for r in rows]
    image = None
    for layer, weights in enumerate(maps):
        y0 = height - top - (layer + 1) * (title_h + panel_h) - layer * xlabels
        for h, panel in enumerate([*weights, weights.mean(0)][:panels]):  # H (R, C), the mean
            x0 = left + h * (panel_w + gap)
            ax = fig.add_axes((x0 / width, y0 / height, panel_w / width, panel_h / height))
            image = ax.imshow(panel.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            name = "attention" if H == 1 else f"head {h + 1}" if h < H else "mean of heads"
            ax.set_title(f"layer {layer + 1}, {name}", fontsize=8)
            ax.set_xticks(range(C), xticks, fontsize=7, rotation=90, **font)
            ax.set_yticks(range(R), yticks if h == 0 else [], fontsize=7, **font)
            ax.tick_params(length=0)
    cax = fig.add_axes(((width - right + 0.3) / width, 0.25, 0.15 / width, 0.5))
    fig.colorbar(image, cax=cax, label="attention weight")
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_heatmaps(
    model: Transformer | RNNEncoderDecoder,
    examples: Sequence[Example],
    predictions: Sequence[str],
    src: Vocab,
    tgt: Vocab,
    out_dir: str | os.PathLike,
) -> list[dict]:
    """Cross- and self-attention PNGs for each example under out_dir/heatmaps/; returns
    one record per example with the paths relative to out_dir ("decoder_self" None for a
    model without decoder self-attention, the RNN)."""
    out_dir = Path(out_dir)
    records = []
    for i, (ex, pred) in enumerate(zip(examples, predictions, strict=True)):
        maps = collect_attention(model, ex.source, pred, src, tgt)
        shown = _drawable(ex.source)
        cross = Path("heatmaps") / f"{i:02d}_{ex.form}_cross.png"
        plot_attention(
            maps.cross, maps.predicted, maps.source,
            f'cross-attention: "{shown}" -> {pred}  (rows: output, columns: input)',
            out_dir / cross,
        )  # fmt: skip
        dec = None
        if maps.decoder_self:
            dec = Path("heatmaps") / f"{i:02d}_{ex.form}_decoder_self.png"
            plot_attention(
                maps.decoder_self, maps.predicted, maps.decoder_in,
                f"decoder self-attention (causal) while writing {pred}", out_dir / dec,
            )  # fmt: skip
        records.append(
            {"source": ex.source, "target": ex.target, "prediction": pred, "form": ex.form,
             "cross": cross.as_posix(), "decoder_self": dec and dec.as_posix()}
        )  # fmt: skip
    return records


_MODEL_NAMES = {
    "transformer": "encoder-decoder Transformer",
    "rnn": "GRU encoder-decoder with additive attention (Bahdanau et al. 2015)",
}


def write_index(
    out_dir: str | os.PathLike, metrics: dict, figures: Sequence[dict], samples: Sequence[dict]
) -> Path:
    """out_dir/index.html: the figures of the run, its metrics and sample translations."""
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(s['source'])}</td><td><code>{e(s['prediction'])}</code></td>"
        f"<td><code>{e(s['target'])}</code></td><td>{'✓' if s['correct'] else '✗'}</td></tr>"
        for s in samples
    )
    blocks = "\n".join(
        f"<section><h3>{e(f['source'])} → <code>{e(f['prediction'])}</code> "
        f"<small>({e(f['form'])}, expected <code>{e(f['target'])}</code>)</small></h3>\n"
        f'<figure><img src="{e(f["cross"])}" alt="cross-attention for {e(f["source"])}">'
        f"<figcaption>Cross-attention: each row is the decoder position that writes one "
        f"output character, each column an input character.</figcaption></figure>\n"
        + (
            f'<figure><img src="{e(f["decoder_self"])}" alt="decoder self-attention for '
            f'{e(f["source"])}"><figcaption>Decoder self-attention (causal: nothing above '
            f"the diagonal).</figcaption></figure>"
            if f.get("decoder_self")
            else ""
        )
        + "</section>"
        for f in figures
    )
    forms = "\n".join(
        f"<tr><td>{e(name)}</td><td>{value:.1%}</td></tr>"
        for name, value in metrics.get("exact_match_by_form", {}).items()
    )
    em = metrics.get("exact_match", float("nan"))
    model = _MODEL_NAMES.get(metrics.get("arch", "transformer"), "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkv demo: dates to ISO 8601</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em; }}
img {{ max-width: 100%; }} figure {{ margin: 0.5em 0 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; }}
</style></head><body>
<h1>qkv demo: written dates → ISO 8601</h1>
<p>Exact match on {metrics.get("eval_examples", 0):,} held-out examples (dates never seen in
training): <b>{em:.2%}</b>. Model: {e(model)}. Training: {metrics.get("train_seconds", 0):.1f} s,
{metrics.get("parameters", 0):,} parameters, {metrics.get("steps", 0):,} steps.
See <a href="metrics.json">metrics.json</a>.</p>
<h2>Sample translations</h2>
<table><tr><th>input</th><th>model</th><th>expected</th><th></th></tr>
{rows}
</table>
<h2>Attention</h2>
{blocks}
<h2>Exact match by written form</h2>
<table><tr><th>form</th><th>exact match</th></tr>
{forms}
</table>
</body></html>
"""
    path = Path(out_dir) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

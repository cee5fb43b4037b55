"""qkv as an attention backend of Hugging Face transformers: `attn_implementation="qkv"`.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk query/key lengths, D head dim.

    import qkv.interop.transformers as qkv_hf
    qkv_hf.register()                                   # once; returns "qkv"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qkv")
    model.set_attn_implementation("qkv")                # or switch a loaded model

transformers asks two things of a backend (see `register`):
- a *mask function*, called once per forward per kind of mask (full, sliding), whose result
  every layer receives: `build_mask` reads transformers' description (the index function
  composed in `transformers.masking_utils`, the 2-D padding mask, the cache offsets) and
  returns a `PreparedMask` holding a structured `qkv.masks` mask — causal and windows with
  the right cache alignment, left/right padding, packed documents — never a (Tq, Tk)
  tensor for those. Any description it does not recognise falls back on the dense mask
  transformers' own `sdpa_mask` builds (correct first, structured where it knows how);
- an *attention function* `attention_forward(module, q, k, v, mask, ...)` with q
  (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D), returning ((B, Tq, Hq, D) output, weights or None).
  Grouped-query heads go to `qkv.attention` as they are (no repeated copies).

Importing this module does not import transformers; `register` does.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch

from .. import masks
from ..functional import attention
from ..masks import Mask
from ._hf.translate import (
    Grid,
    Piece,
    Unrecognised,
    agrees,
    is_causal,
    key_mask,
    to_mask,
    translate,
)

__all__ = ["PreparedMask", "attention_forward", "build_mask", "register"]

_log = logging.getLogger(__name__)

# Names transformers gives meaning to: registering qkv under one would replace its backend.
_RESERVED = ("eager", "sdpa", "flash_attention", "flex_attention", "paged")


def _import_transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            "qkv.interop.transformers needs Hugging Face transformers: "
            'pip install "qkv[transformers]"'
        ) from err


def register(name: str = "qkv") -> str:
    """Register qkv in transformers under `name`; returns `name` (calling it again is harmless).

    Registers both `attention_forward` (transformers.AttentionInterface) and `build_mask`
    (transformers.masking_utils.AttentionMaskInterface): a name without a mask function
    would get no mask at all, silently dropping causality. transformers older than the
    mask interface (< 4.53) builds its own 4-D masks, which `attention_forward` also takes.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register: name must be a non-empty str; got {name!r}")
    if any(name.startswith(r) for r in _RESERVED) or "|" in name:
        raise ValueError(
            f"register: name {name!r} is transformers' own (or starts like one); choose another"
        )
    transformers = _import_transformers()
    transformers.AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return name
    AttentionMaskInterface.register(name, build_mask)
    return name


@dataclass(eq=False)
class PreparedMask:
    """What `build_mask` returns and every layer's `attention_forward` receives.

    mask: the qkv mask over (B, Hq, Tq, Tk) (None: every pair allowed, or plain causal);
    causal: the mask is exactly bottom-right causal (qkv's fused causal kernels run it);
    structured: False when the description was not recognised and `mask` wraps the dense
    (B, 1, Tq, Tk) tensor transformers built; `reason` then says what was not recognised.
    """

    mask: Mask | None
    causal: bool
    B: int
    Tq: int
    Tk: int
    structured: bool = True
    reason: str = field(default="")

    def __repr__(self) -> str:
        what = "causal" if self.causal else repr(self.mask).splitlines()[0]
        kind = "structured" if self.structured else f"dense ({self.reason})"
        return f"PreparedMask({what}; B={self.B}, Tq={self.Tq}, Tk={self.Tk}; {kind})"


def _as_int(x, name: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"build_mask: {name} must be a single integer; got {tuple(x.shape)}")
        x = x.item()
    return int(x)


def _padding_keep(attention_mask, B: int, kv_offset: int, Tk: int, device) -> torch.Tensor | None:
    """The (B, Tk) bool slice of the 2-D mask for these keys (positions past its end are
    padding, as transformers' `prepare_padding_mask` has it)."""
    if attention_mask is None:
        return None
    am = torch.as_tensor(attention_mask, device=device)
    if am.dim() != 2:
        raise ValueError(f"build_mask: attention_mask must be (B, L); got shape {tuple(am.shape)}")
    am = am.bool()
    short = kv_offset + Tk - am.shape[1]
    if short > 0:
        am = torch.nn.functional.pad(am, (0, short), value=False)
    return am[:, kv_offset : kv_offset + Tk].expand(B, Tk)


def build_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> PreparedMask:
    """transformers' mask description as a `PreparedMask` (the AttentionMaskInterface entry).

    Query i stands at position q_offset + i and key j at kv_offset + j; `mask_function`
    (b, h, q_pos, kv_pos) -> bool says which pairs may attend and `attention_mask` (B, L)
    which keys are real (True / 1). The result is built once per forward and reused by
    every layer: masks holding tensors come as their `qkv.kernels.TilePlan` (tile kinds,
    submasks and the engine's jobs computed once); causal and windows, which hold none,
    have their plans kept by the tiled kernel across layers and forwards.
    """
    mu = importlib.import_module("transformers.masking_utils")
    fn = mu.causal_mask_function if mask_function is None else mask_function
    device = torch.device(kwargs.get("device", "cpu"))
    call = dict(kwargs, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                q_offset=q_offset, kv_offset=kv_offset, mask_function=fn,
                attention_mask=attention_mask)  # fmt: skip
    B, Tk = _as_int(batch_size, "batch_size"), _as_int(kv_length, "kv_length")
    positions = kwargs.get("cache_position")  # transformers < 4.56 gives the query positions
    if q_length is None and positions is not None:
        Tq, q_offset = len(positions), int(positions[0]) if len(positions) else 0
    else:
        Tq, q_offset = _as_int(q_length, "q_length"), _as_int(q_offset, "q_offset")
    grid = Grid(B, Tq, Tk, q_offset, _as_int(kv_offset, "kv_offset"), device)
    keep = _padding_keep(attention_mask, B, grid.kv_offset, Tk, device)
    try:
        if positions is not None and not torch.equal(positions.cpu(), grid.q_pos().cpu()):
            raise Unrecognised("query positions that are not consecutive")
        piece = translate(fn, grid) & Piece(mask=None if keep is None else key_mask(keep, grid))
        mask = to_mask(piece, grid)
        if not agrees(fn, keep, grid, mask):
            raise Unrecognised("its values differ from this module's reading of it")
    except Unrecognised as why:
        return _dense(mu, call, B, Tq, Tk, str(why))
    if is_causal(piece, grid):
        return PreparedMask(None, True, B, Tq, Tk)
    if mask is not None and mask.cache_key() is None and mask.form != "key_padding":
        # holds tensors (padding, documents): the tiled kernel would plan it in every
        # layer, so the plan is built here, once per forward, and every layer runs it
        mask = mask.plan(Tq, Tk, device=device)
    return PreparedMask(mask, False, B, Tq, Tk)


def _dense(mu, call: dict, B: int, Tq: int, Tk: int, reason: str) -> PreparedMask:
    """The mask transformers' own sdpa_mask builds, (B, 1, Tq, Tk) bool, wrapped for qkv."""
    call.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    dense = mu.sdpa_mask(**call)
    _log.debug("qkv: dense mask for %s", reason)
    return PreparedMask(masks.from_dense(dense), False, B, Tq, Tk, structured=False, reason=reason)


def _refuse(module, kwargs: dict) -> None:
    """Options qkv cannot honour raise, naming the model option, rather than run differently."""
    name = type(module).__name__
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{name}: qkv attention has no logit softcapping (the model's "
            f"attn_logit_softcapping={kwargs['softcap']}); use attn_implementation='eager'"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{name}: qkv attention has no attention sinks (the model's `sinks` passed as "
            "s_aux); use attn_implementation='eager'"
        )
    if kwargs.get("head_mask") is not None:
        raise ValueError(
            f"{name}: qkv attention takes no head_mask; use attn_implementation='eager'"
        )


def _wants_weights(module, kwargs: dict) -> bool:
    """Whether the caller asked for the attention weights (output_attentions)."""
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    try:  # transformers 5 records outputs through hooks and may not pass the flag down
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()
    except (ImportError, LookupError, AttributeError):
        collected = None
    if collected and any(key.endswith("attentions") for key in collected):
        return True
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _mask_and_bias(attention_mask, query, key, module, is_causal, sliding_window, kwargs):
    """(mask, causal, bias) for qkv.attention from what the layer was given."""
    Tq, Tk = query.shape[2], key.shape[2]
    if isinstance(attention_mask, PreparedMask):
        if (attention_mask.Tq, attention_mask.Tk) != (Tq, Tk):
            raise ValueError(
                f"attention_mask was built for (Tq, Tk)={(attention_mask.Tq, attention_mask.Tk)} "
                f"but the layer has query {tuple(query.shape)} and key {tuple(key.shape)}"
            )
        return attention_mask.mask, attention_mask.causal, None
    if attention_mask is None and any(
        kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k")
    ):
        raise ValueError(
            "qkv attention got variable-length (cu_seq_lens) inputs without a mask, as "
            "continuous batching passes them; pass position_ids or an attention_mask instead"
        )
    if attention_mask is None:  # no mask was built: follow the layer, as transformers' sdpa does
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        mask = None
        if causal and sliding_window is not None:
            mask = masks.window(int(sliding_window) - 1)  # kv_pos > q_pos - sliding_window
        return mask, causal and mask is None, None
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dtype == torch.bool:
            return attention_mask, False, None
        if attention_mask.is_floating_point():  # an additive mask, as eager adds it
            return None, False, attention_mask[..., :Tk]
    raise TypeError(
        "attention_mask must be a qkv PreparedMask, a bool or float tensor, or None; got "
        f"{type(attention_mask).__name__} (is the model's attn_implementation the name that "
        "qkv.interop.transformers.register returned?)"
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One transformers attention layer through `qkv.attention` (the AttentionInterface entry).

    query (B, Hq, Tq, D), key (B, Hkv, Tk, D), value (B, Hkv, Tk, Dv); returns the output
    (B, Tq, Hq, Dv) and, when output_attentions was asked for, the weights (B, Hq, Tq, Tk)
    (recomputed from the log-sum-exp on the tiled path; before dropout), else None.
    Dropout draws from torch's global generator, so torch.manual_seed reproduces it.
    Query rows that may attend to nothing (left-padding positions) give 0 where eager
    averages every value; real tokens never see those rows.
    """
    _refuse(module, kwargs)
    mask, causal, bias = _mask_and_bias(
        attention_mask, query, key, module, is_causal, sliding_window, kwargs
    )
    if position_bias is not None:  # relative positions added to the scores (T5-style models)
        bias = position_bias if bias is None else bias + position_bias
    want = _wants_weights(module, kwargs)
    result = attention(
        query, key, value, mask=mask, bias=bias, causal=causal, scale=scaling,
        dropout_p=float(dropout), return_weights=want,
    )  # fmt: skip
    out, weights = (result.output, result.weights) if want else (result, None)
    return out.transpose(1, 2).contiguous(), weights  # (B, Tq, Hq, Dv)

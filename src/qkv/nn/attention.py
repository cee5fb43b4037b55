"""`MultiHeadAttention`: the module that owns the projections and calls `qkv.attention`.

Letters: B batch, Tq query length, Tk key length, E model width (embed_dim), Ek/Ev key and
value input widths (kdim/vdim), H query heads, Hkv key/value heads, D = E / H head dim.

The five steps of the forward pass (Vaswani et al. 2017, §3.2.2), numbered in the code:

    1) project queries, keys and values, each with its own weights:  (B, T, E*) -> (B, T, H*D)
    2) split the *feature* axis into heads:                 (B, T, H*D) -> (B, H, T, D)
       (then: rotary positions, cosine normalisation, cache)
    3) attend, every head independently, through `qkv.attention`:  (B, H, Tq, D)
    4) merge the heads back side by side:                   (B, H, Tq, D) -> (B, Tq, E)
    5) output projection:                                   (B, Tq, E) -> (B, Tq, E)

Masks use qkv's one convention, **True = may attend**. `forward(mask=...)` accepts:

    (B, Tk)          bool: key padding, True = a real key (every query of row b sees them)
    (B, Tq, Tk)      bool: one matrix per batch row
    (B|1, H|1, Tq|1, Tk|1)  bool: anything broadcastable, as `qkv.attention` takes it
    a qkv.masks mask (causal(), window(...), padding(lengths), document(ids), ...)

A (Tq, Tk) matrix shared by the batch is written `m[None, None]` (a 2-D mask is always read
as key padding, whatever its size). With a cache, Tk counts the cached keys too.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import attention
from ..masks import Mask
from .cache import AttentionCache
from .positional import ALiBi, RotaryEmbedding

__all__ = ["MultiHeadAttention"]

_SCORES = ("dot", "cosine")
# Cosine attention's learned temperature is capped at 100 as in Swin Transformer V2 (Liu et
# al. 2022, §3.2): without a cap it can grow until the softmax saturates.
_MAX_LOGIT_SCALE = math.log(100.0)


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(x).__name__} {x!r}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1; got {x}")
    return int(x)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over batch-first (B, T, E) inputs; all math in `qkv.attention`.

    Args:
        embed_dim: E, the width of queries and of the output; must be divisible by num_heads.
        num_heads: H, the number of query heads; each sees all T positions and D = E / H of
            the features (heads split the feature axis, never the sequence axis).
        kdim: Ek, the width of key inputs (default E); for cross-attention.
        vdim: Ev, the width of value inputs (default E).
        num_kv_heads: Hkv key/value heads (default H). Hkv < H shares each key/value head
            among H / Hkv query heads: grouped-query attention (Ainslie et al. 2023); Hkv = 1
            is multi-query attention (Shazeer 2019). Must divide H.
        bias: whether the four projections have biases.
        dropout: probability of dropping an attention weight, in training mode only.
        score: "dot" (scaled dot product, the default) or "cosine": queries and keys are
            L2-normalised and multiplied by a learned per-head temperature (QK-norm; Henry et
            al. 2020, Swin V2), which keeps the logits bounded whatever the activations do.
        cosine_scale: the initial temperature of "cosine" scores.
        rotary: a `RotaryEmbedding` applied to queries and keys after the heads are split
            (RoFormer, Su et al. 2021); positions continue from the cache length.
        alibi: an `ALiBi` whose bias is added to the scores (Press et al. 2022); it is
            bottom-right aligned, so it stays right when the queries are the last cached ones.
        device, dtype: of the parameters.

    `rotary` and `alibi` describe positions *within one sequence*: use them for self-attention.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        score: str = "dot",
        cosine_scale: float = 10.0,
        rotary: RotaryEmbedding | None = None,
        alibi: ALiBi | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): each "
                f"head takes embed_dim / num_heads features"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}): each "
                "key/value head serves a whole group of query heads"
            )
        kdim = embed_dim if kdim is None else _positive_int(kdim, "kdim")
        vdim = embed_dim if vdim is None else _positive_int(vdim, "vdim")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a float; got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}; got {score!r}")
        if not (isinstance(cosine_scale, numbers.Real) and 0 < cosine_scale <= 100.0):
            raise ValueError(f"cosine_scale must lie in (0, 100]; got {cosine_scale!r}")
        head_dim = embed_dim // num_heads
        if rotary is not None and not isinstance(rotary, RotaryEmbedding):
            raise TypeError(
                f"rotary must be None or a qkv.nn.RotaryEmbedding; got {type(rotary).__name__}"
            )
        if rotary is not None and rotary.head_dim != head_dim:
            raise ValueError(
                f"rotary was built for head_dim={rotary.head_dim} but this module's heads have "
                f"D = embed_dim / num_heads = {head_dim}"
            )
        if alibi is not None and not isinstance(alibi, ALiBi):
            raise TypeError(f"alibi must be None or a qkv.nn.ALiBi; got {type(alibi).__name__}")
        if alibi is not None and alibi.num_heads != num_heads:
            raise ValueError(f"alibi has {alibi.num_heads} heads but num_heads is {num_heads}")

        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dropout = float(dropout)
        self.score = score
        factory = {"device": device, "dtype": dtype}
        # Three separate projections: keys and values never reuse the query's weights.
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        if score == "cosine":
            init = torch.full((num_heads, 1, 1), math.log(cosine_scale), **factory)
            self.logit_scale = nn.Parameter(init)  # (H, 1, 1), log temperature per head
        else:
            self.register_parameter("logit_scale", None)
        self.rotary = rotary
        self.alibi = alibi
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases, like torch.nn.MultiheadAttention."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if (self.kdim, self.vdim) != (self.embed_dim, self.embed_dim):
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.score != "dot":
            parts.append(f"score={self.score!r}")
        return ", ".join(parts)

    def new_cache(self, *, cross: bool = False, capacity: int | None = None) -> AttentionCache:
        """An empty cache for incremental decoding with this module (see `qkv.nn.cache`)."""
        return AttentionCache(self, cross=cross, capacity=capacity)

    # ---- input checks -------------------------------------------------------------------

    def _check_input(self, x, name: str, width: int, width_name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, T, {width_name}); got {type(x)}")
        if x.dim() == 2:
            raise ValueError(
                f"{name} must be batched (B, T, {width_name}); got shape {_shape(x)}. "
                f"MultiHeadAttention takes batch-first input only: add a batch dimension "
                f"with {name}.unsqueeze(0)"
            )
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (B, T, {width_name}); got {_shape(x)}")
        if x.shape[-1] != width:
            raise ValueError(
                f"{name} has {x.shape[-1]} features but the module expects {width_name}="
                f"{width}; got shape {_shape(x)}"
            )
        weight = self.q_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} is {x.dtype} but the parameters are {weight.dtype}; convert one "
                f"with .to(dtype)"
            )
        return x

    def _normalise_mask(self, mask, B: int, Tq: int, Tk: int):
        """Bring a mask of any accepted shape to what `qkv.attention` takes."""
        if mask is None or isinstance(mask, Mask):
            return mask
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"mask must be None, a bool tensor or a qkv.masks mask; got {type(mask).__name__}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor with True = may attend; got {mask.dtype} of shape "
                f"{_shape(mask)}. (torch's key_padding_mask marks ignored keys True: pass "
                "~key_padding_mask)"
            )
        if mask.dim() == 2:
            if _shape(mask) != (B, Tk):
                shared = mask.shape[0] == Tq
                hint = " (for a (Tq, Tk) matrix pass mask[None, None])" if shared else ""
                raise ValueError(
                    f"a 2-D mask is a key padding mask (B, Tk)={(B, Tk)}, True = real key; got "
                    f"shape {_shape(mask)}{hint}"
                )
            return mask[:, None, None, :]  # (B, 1, 1, Tk)
        if mask.dim() == 3:
            if any(g not in (1, w) for g, w in zip(mask.shape, (B, Tq, Tk), strict=True)):
                raise ValueError(
                    f"a 3-D mask must broadcast to (B, Tq, Tk)={(B, Tq, Tk)}; got {_shape(mask)}"
                )
            return mask[:, None]  # (B, 1, Tq, Tk)
        if mask.dim() == 4:
            return mask  # qkv.attention checks it broadcasts to (B, H, Tq, Tk)
        raise ValueError(
            f"mask must be (B, Tk), (B, Tq, Tk) or (B, H, Tq, Tk); got shape {_shape(mask)}"
        )

    def _check_cache(self, cache) -> AttentionCache:
        if not isinstance(cache, AttentionCache):
            raise TypeError(
                f"cache must be an AttentionCache from this module's new_cache(); got "
                f"{type(cache).__name__}"
            )
        if cache.owner is not self:
            raise ValueError(
                "cache was made by another attention module; each module needs its own "
                "(use this module's new_cache())"
            )
        if cache.cross and (self.rotary is not None or self.alibi is not None):
            raise ValueError(
                "rotary and alibi positions are defined within one sequence (self-attention); "
                "they cannot be used with a cross-attention cache"
            )
        return cache

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | Mask | None = None,
        causal: bool = False,
        need_weights: bool = False,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from `query` to `key`/`value` (to `query` itself when they are omitted).

        Args:
            query: (B, Tq, E).
            key: (B, Tk, Ek), or None for self-attention (key = value = query).
            value: (B, Tk, Ev); defaults to `key`.
            mask: True = may attend; (B, Tk), (B, Tq, Tk), (B, H, Tq, Tk) bool or a qkv.masks
                mask (see the module docstring). Tk includes cached keys.
            causal: bottom-right aligned causal mask (query i of the last Tq positions sees
                keys j <= i + Tk - Tq), ANDed with `mask`.
            need_weights: also return the per-head weights (B, H, Tq, Tk), before dropout.
            cache: an `AttentionCache` from `new_cache()`. A self-attention cache appends this
                call's keys and values and attends over all of them; a cross-attention cache
                computes them from `key` on the first call and reuses them afterwards (`key`
                may then be None).

        Returns:
            (B, Tq, E), or ((B, Tq, E), (B, H, Tq, Tk)) with `need_weights`.
        """
        query = self._check_input(query, "query", self.embed_dim, "E")
        if not isinstance(need_weights, bool):
            raise TypeError(f"need_weights must be a bool; got {type(need_weights).__name__}")
        B, Tq, _ = query.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if cache is not None:
            cache = self._check_cache(cache)
        reuse = cache is not None and cache.cross and cache.filled
        if key is None and value is not None:
            raise ValueError("value was given without key; pass key too (or neither)")
        if key is None and not reuse:
            if (self.kdim, self.vdim) != (self.embed_dim, self.embed_dim):
                raise ValueError(
                    f"self-attention (key=None) needs kdim = vdim = embed_dim; this module has "
                    f"kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}"
                )
            key = value = query
        value = key if value is None else value

        # 1) project, each with its own weights, and 2) split the feature axis into heads
        q = self.q_proj(query).view(B, Tq, H, D).transpose(1, 2)  # (B, H, Tq, D)
        offset = 0 if cache is None or cache.cross else cache.length
        if reuse and cache is not None:
            k, v = cache.keys(), cache.values()  # (B, Hkv, Tk, D), computed on the first call
            if k.shape[0] != B:
                raise ValueError(
                    f"cross-attention cache holds {k.shape[0]} batch rows; query has B={B}"
                )
        else:
            key = self._check_input(key, "key", self.kdim, "Ek")
            value = self._check_input(value, "value", self.vdim, "Ev")
            if key.shape[0] != B or value.shape[0] != B or key.shape[1] != value.shape[1]:
                raise ValueError(
                    f"query (B, Tq, E), key (B, Tk, Ek) and value (B, Tk, Ev) must agree on B "
                    f"and Tk; got {_shape(query)}, {_shape(key)}, {_shape(value)}"
                )
            Tn = key.shape[1]
            k = self.k_proj(key).view(B, Tn, Hkv, D).transpose(1, 2)  # (B, Hkv, Tn, D)
            v = self.v_proj(value).view(B, Tn, Hkv, D).transpose(1, 2)  # (B, Hkv, Tn, D)
            if self.rotary is not None:
                # Rotating k before caching it: a key's rotation depends only on its own
                # position, so cached keys never need to be touched again.
                k = self.rotary(k, offset=offset)
        if self.rotary is not None:
            q = self.rotary(q, offset=offset)

        scale = None  # qkv.attention's default 1/sqrt(D)
        if self.logit_scale is not None:
            # Cosine scores: unit-length q and k, times a learned temperature. The temperature
            # multiplies q (not `scale=`) so that autograd can learn it.
            temperature = self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()  # (H, 1, 1)
            q = F.normalize(q, dim=-1) * temperature.to(q.dtype)  # (B, H, Tq, D)
            if not reuse:
                k = F.normalize(k, dim=-1)  # cached keys are stored normalised
            scale = 1.0
        Tk = offset + k.shape[2]  # keys attended to: the cached ones and these
        mask = self._normalise_mask(mask, B, Tq, Tk)  # checked before the cache changes
        if cache is not None and not reuse:
            k, v = cache.store(k, v) if cache.cross else cache.append(k, v)

        # 3) attend (positions as an ALiBi bias, dropout only while training)
        bias = None
        if self.alibi is not None:
            bias = self.alibi(Tq, Tk, device=q.device, dtype=q.dtype)  # (1, H, Tq, Tk)
        result = attention(
            q, k, v,
            mask=mask,
            bias=bias,
            causal=causal,
            scale=scale,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=need_weights,
        )  # fmt: skip
        out = result.output if need_weights else result  # (B, H, Tq, D)

        # 4) merge the heads side by side, and 5) output projection
        out = out.transpose(1, 2).reshape(B, Tq, H * D)  # (B, Tq, E)
        out = self.out_proj(out)  # (B, Tq, E)
        return (out, result.weights) if need_weights else out

    # ---- torch interop ------------------------------------------------------------------

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """The same function with the same weights as `m`, always taking batch-first input.

        torch keeps q/k/v in one `in_proj_weight` (3E, E) when kdim = vdim = E and in
        separate `q_proj_weight`, `k_proj_weight`, `v_proj_weight` otherwise; both become
        qkv's three projections. Masks differ in polarity: torch's key_padding_mask and bool
        attn_mask mark *forbidden* pairs True, qkv's mask marks *allowed* ones, so pass
        `mask=~key_padding_mask`. torch also returns weights after dropout, qkv before.
        """
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects torch.nn.MultiheadAttention; got {type(m)}")
        if m.bias_k is not None or m.bias_v is not None:
            raise ValueError("from_torch: add_bias_kv=True is not supported by qkv")
        if m.add_zero_attn:
            raise ValueError("from_torch: add_zero_attn=True is not supported by qkv")
        weight = m.out_proj.weight
        has_bias = m.in_proj_bias is not None
        new = cls(
            m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim, bias=has_bias,
            dropout=m.dropout, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        E = m.embed_dim
        with torch.no_grad():
            if m.in_proj_weight is not None:
                w_q, w_k, w_v = m.in_proj_weight.split(E)  # 3 × (E, E)
            else:
                w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
            new.q_proj.weight.copy_(w_q)
            new.k_proj.weight.copy_(w_k)
            new.v_proj.weight.copy_(w_v)
            new.out_proj.weight.copy_(m.out_proj.weight)
            if has_bias:
                b_q, b_k, b_v = m.in_proj_bias.split(E)  # 3 × (E,)
                new.q_proj.bias.copy_(b_q)
                new.k_proj.bias.copy_(b_k)
                new.v_proj.bias.copy_(b_v)
                new.out_proj.bias.copy_(m.out_proj.bias)
        return new.train(m.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """The equivalent `torch.nn.MultiheadAttention(batch_first=True)`, same weights.

        Only for plain multi-head attention: torch has no grouped-query heads, cosine scores,
        rotary or ALiBi positions (ValueError for those).
        """
        unsupported = {
            "num_kv_heads != num_heads": self.num_kv_heads != self.num_heads,
            "score='cosine'": self.score != "dot",
            "rotary": self.rotary is not None,
            "alibi": self.alibi is not None,
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise ValueError(f"to_torch: torch.nn.MultiheadAttention has no {', '.join(found)}")
        weight = self.q_proj.weight
        has_bias = self.q_proj.bias is not None
        m = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias,
            kdim=self.kdim, vdim=self.vdim, batch_first=True,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            ws = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            if m.in_proj_weight is not None:
                m.in_proj_weight.copy_(torch.cat(ws))  # (3E, E)
            else:
                m.q_proj_weight.copy_(ws[0])
                m.k_proj_weight.copy_(ws[1])
                m.v_proj_weight.copy_(ws[2])
            m.out_proj.weight.copy_(self.out_proj.weight)
            if has_bias:
                bs = (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
                m.in_proj_bias.copy_(torch.cat(bs))  # (3E,)
                m.out_proj.bias.copy_(self.out_proj.bias)
        return m.train(self.training)

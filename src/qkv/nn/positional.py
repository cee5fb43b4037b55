"""Positional information for attention, which on its own is blind to order.

Letters: B batch, H heads, T sequence length, E model width, D head dim,
Tq/Tk query/key lengths.

Attention is permutation-equivariant: shuffle the keys (with their values) and every output
is unchanged. Word order has to be put in from outside, and there are two places to do it:

* into the *input* of the model, once, before the first layer:
  `SinusoidalPositionalEncoding` (fixed) and `LearnedPositionalEmbedding` (trained) add a
  vector per position to the token embeddings, (B, T, E) -> (B, T, E);
* into *every attention call*: `RotaryEmbedding` rotates q and k by their positions, so
  the score q_m·k_n depends on m - n only; `ALiBi` adds a bias to the scores that falls
  linearly with the distance between query and key.

The last two are *relative* and meant for decoding with a KV cache: every module here takes
the position of the first element (`offset`, or the bottom-right alignment of ALiBi), so a
new token at position t gets exactly what it would have got in a full-length pass.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = [
    "ALiBi",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
]


# ---- small validators: errors that name the argument ------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}")
    return int(value)


def _offset(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"offset must be an int; got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"offset must be >= 0 (the position of the first element); got {value}")
    return int(value)


def _rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1); got {value}")
    return float(value)


def _base(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"base must be a float; got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 1.0):
        raise ValueError(f"base must be a finite number > 1; got {value}")
    return float(value)


def _check_x(x, layout: str, width: int, width_name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor {layout}; got {got}")
    if x.dim() != len(layout.split(",")):
        raise ValueError(f"x must have shape {layout}; got shape {tuple(x.shape)}")
    if x.shape[-1] != width:
        raise ValueError(
            f"x must have shape {layout} with the last dim equal to {width_name}={width}; "
            f"got shape {tuple(x.shape)}"
        )
    return x


def _angle_dtype(device: torch.device) -> torch.dtype:
    # Angles pos·ω reach thousands of radians; in float32 their rounding alone is ~1e-4 rad
    # at position 4096. Compute them in float64 and round only the cos/sin values (MPS has
    # no float64, so it keeps float32 there).
    return torch.float32 if device.type == "mps" else torch.float64


def _frequencies(dim: int, base: float, device: torch.device) -> Tensor:
    """ω_i = base^(-2i/dim) for i = 0 .. ceil(dim/2) - 1: shape (ceil(dim/2),)."""
    dtype = _angle_dtype(device)
    exponent = torch.arange(0, dim, 2, dtype=dtype, device=device) / dim  # (ceil(dim/2),)
    return base**-exponent


# ---- absolute positions, added to the input ----------------------------------------------


def _sinusoidal_table(positions: Tensor, embed_dim: int, base: float, dtype) -> Tensor:
    """PE[pos, 2i] = sin(pos·ω_i), PE[pos, 2i+1] = cos(pos·ω_i): (T,) -> (T, E)."""
    freqs = _frequencies(embed_dim, base, positions.device)  # (ceil(E/2),)
    angles = positions.to(freqs.dtype)[:, None] * freqs[None, :]  # (T, ceil(E/2))
    table = angles.new_empty(positions.shape[0], embed_dim)  # (T, E)
    table[:, 0::2] = torch.sin(angles)  # even dims: ceil(E/2) of them
    table[:, 1::2] = torch.cos(angles[:, : embed_dim // 2])  # odd dims: floor(E/2)
    return table.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed sinusoids of the Transformer (Vaswani et al. 2017, §3.5), added to x.

    ``PE[pos, 2i] = sin(pos / base^(2i/E))`` and ``PE[pos, 2i+1] = cos(pos / base^(2i/E))``:
    each pair of dims is a clock turning at its own speed, from one turn per 2π positions
    down to one per 2π·base. Why sinusoids: for a fixed shift k, PE(pos + k) is a rotation
    of PE(pos) (the angle-sum formulas), the same for every pos, so relative offsets are a
    linear function the attention projections can learn; and they extend past any length
    seen in training. Attention itself is unchanged; the positions ride along in x.

    The table for positions [0, max_len) is precomputed in float32; later positions, and
    float64 inputs (whose precision a float32 table would cap), are computed on the fly.
    The paper also multiplies the token embeddings by sqrt(E); that belongs to the
    embedding layer, not here.

    Args:
        embed_dim: E, the model width.
        max_len: positions to precompute.
        dropout: dropout rate applied to the sum (the paper uses 0.1).
        base: the longest wavelength is 2π·base.

    Shapes: ``forward(x (B, T, E), offset=0) -> (B, T, E)``, x + PE[offset : offset + T].
    """

    def __init__(
        self, embed_dim: int, *, max_len: int = 4096, dropout: float = 0.0, base: float = 10000.0
    ) -> None:
        super().__init__()
        self.embed_dim = _positive_int(embed_dim, "embed_dim")
        self.max_len = _positive_int(max_len, "max_len")
        self.base = _base(base)
        self.dropout = nn.Dropout(_rate(dropout, "dropout"))
        positions = torch.arange(self.max_len)
        table = _sinusoidal_table(positions, self.embed_dim, self.base, torch.float32)
        # Not persistent: it is a function of the arguments, so checkpoints need not carry it.
        self.register_buffer("pe", table, persistent=False)  # (max_len, E)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, T, E) -> dropout(x + PE[offset : offset + T]), (B, T, E) in x's dtype."""
        _check_x(x, "(B, T, E)", self.embed_dim, "embed_dim")
        start = _offset(offset)
        end = start + x.shape[1]
        if x.dtype == torch.float64 or end > self.pe.shape[0]:
            positions = torch.arange(start, end, device=x.device)  # (T,)
            pe = _sinusoidal_table(positions, self.embed_dim, self.base, x.dtype)  # (T, E)
        else:
            pe = self.pe[start:end].to(x.dtype)  # (T, E)
        return self.dropout(x + pe)  # (B, T, E), pe broadcast over the batch

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_len={self.max_len}, base={self.base}"


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position, added to x (BERT, GPT-2).

    Vaswani et al. 2017 (§3.5) found learned and sinusoidal encodings about equally good;
    learned ones are simpler but know nothing about positions they never saw, so a position
    at or beyond `max_len` raises ValueError instead of being silently clamped or wrapped.

    Initialised from N(0, 0.02²), the scale BERT and GPT-2 use, small next to the token
    embeddings.

    Shapes: ``forward(x (B, T, E), offset=0) -> (B, T, E)``, x + W[offset : offset + T].
    """

    def __init__(self, max_len: int, embed_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.max_len = _positive_int(max_len, "max_len")
        self.embed_dim = _positive_int(embed_dim, "embed_dim")
        self.weight = nn.Parameter(torch.empty(self.max_len, self.embed_dim))  # (max_len, E)
        self.dropout = nn.Dropout(_rate(dropout, "dropout"))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, T, E) -> dropout(x + W[offset : offset + T]), (B, T, E) in x's dtype."""
        _check_x(x, "(B, T, E)", self.embed_dim, "embed_dim")
        start = _offset(offset)
        end = start + x.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"positions {start}..{end - 1} go beyond max_len={self.max_len} of this learned "
                f"embedding (x has T={x.shape[1]}, offset={start}); build it with a larger "
                "max_len or use SinusoidalPositionalEncoding/RotaryEmbedding, which extrapolate"
            )
        return self.dropout(x + self.weight[start:end].to(x.dtype))  # (B, T, E)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, embed_dim={self.embed_dim}"


# ---- relative positions, inside attention ------------------------------------------------


def _rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles pos·θ_k, θ_k = base^(-2k/D): (...,) -> two (..., D/2)."""
    freqs = _frequencies(head_dim, base, positions.device)  # (D/2,)
    angles = positions.to(freqs.dtype)[..., None] * freqs  # (..., D/2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pair k = (x[k], x[k + D/2]) of x (..., D) by the angle whose cos/sin are given.

    cos and sin broadcast against (..., D/2).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each: the first and second halves
    # (x1 + i·x2)·(cos + i·sin) = (x1·cos - x2·sin) + i·(x2·cos + x1·sin)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., D)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, RoPE (Su et al. 2021, RoFormer), applied to q and to k.

    Each pair of dims of a query or key at position m is rotated by the angle m·θ_k, with
    θ_k = base^(-2k/D) (the frequencies of the sinusoidal encoding). A rotation preserves
    lengths and rotating both vectors of a dot product only leaves the angle between them,
    so ``rope(q, m) · rope(k, n)`` is a function of q, k and m - n alone: attention
    sees relative positions, while keys can still be cached after rotation, since a key's
    rotation depends only on its own position. Apply it to q and k after the projections
    and the head split, before the scores; never to v.

    Pairing convention: **rotate-half**. Pair k is (x[k], x[k + D/2]), the layout of
    GPT-NeoX and Hugging Face's Llama (`rotate_half`); weights trained with that
    convention load unchanged. The RoFormer paper and GPT-J/Meta's original Llama pair
    neighbours (x[2k], x[2k+1]); the two differ by a fixed permutation of the dims inside
    the q/k projections, so neither is more correct, but mixing them is wrong.

    Positions [0, max_positions) come from a float32 cos/sin cache; later positions, per-
    sequence tensor offsets and float64 inputs compute the angles on the fly (in float64), so
    any position works.

    Shapes: ``forward(x (B, H, T, D), offset=0) -> (B, H, T, D)``, same dtype. `offset` is an
    int, the position of x[:, :, 0] (the cache length when decoding), or a LongTensor (B,)
    of per-sequence offsets (batches whose sequences are at different lengths). Tensor
    offsets are not range-checked, which would force a device sync.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, max_positions: int = 4096):
        super().__init__()
        self.head_dim = _positive_int(head_dim, "head_dim")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim must be even (RoPE rotates pairs of dims); got head_dim={head_dim}"
            )
        self.base = _base(base)
        self.max_positions = _positive_int(max_positions, "max_positions")
        positions = torch.arange(self.max_positions)
        cos, sin = _rope_cos_sin(positions, self.head_dim, self.base, torch.float32)
        self.register_buffer("cos_cached", cos, persistent=False)  # (max_positions, D/2)
        self.register_buffer("sin_cached", sin, persistent=False)  # (max_positions, D/2)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Rotate x (B, H, T, D) as if it stood at positions offset .. offset + T - 1."""
        _check_x(x, "(B, H, T, D)", self.head_dim, "head_dim")
        B, _, T, _ = x.shape
        if isinstance(offset, Tensor):
            if offset.is_floating_point() or offset.dtype == torch.bool:
                raise TypeError(f"offset must be an int or an integer tensor; got {offset.dtype}")
            if offset.dim() == 0:
                positions = offset.to(x.device) + torch.arange(T, device=x.device)  # (T,)
                cos, sin = _rope_cos_sin(positions, self.head_dim, self.base, x.dtype)
            elif offset.shape == (B,):
                steps = torch.arange(T, device=x.device)  # (T,)
                positions = offset.to(x.device)[:, None] + steps[None, :]  # (B, T)
                cos, sin = _rope_cos_sin(positions, self.head_dim, self.base, x.dtype)
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): one per sequence
            else:
                raise ValueError(
                    f"offset as a tensor must have shape (B,)=({B},) or be a scalar; got "
                    f"shape {tuple(offset.shape)}"
                )
        else:
            start = _offset(offset)
            end = start + T
            if x.dtype != torch.float64 and end <= self.cos_cached.shape[0]:
                cos = self.cos_cached[start:end].to(x.dtype)  # (T, D/2)
                sin = self.sin_cached[start:end].to(x.dtype)  # (T, D/2)
            else:
                positions = torch.arange(start, end, device=x.device)  # (T,)
                cos, sin = _rope_cos_sin(positions, self.head_dim, self.base, x.dtype)
        return _rotate_pairs(x, cos, sin)  # (B, H, T, D)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, max_positions={self.max_positions}"


def _alibi_slopes(num_heads: int) -> list[float]:
    """The head slopes of Press et al. 2022, §3 (and their reference code)."""
    if num_heads & (num_heads - 1) == 0:  # a power of two n: 2^(-8/n), 2^(-16/n), ..., 2^-8
        return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]
    # Otherwise: the slopes of the largest power of two below n, then every other slope of
    # the sequence for twice that power (which interleaves with the first), as many as
    # needed.
    below = 1 << (num_heads.bit_length() - 1)
    return _alibi_slopes(below) + _alibi_slopes(2 * below)[0::2][: num_heads - below]


class ALiBi(nn.Module):
    """Attention with Linear Biases (Press et al. 2022, "Train Short, Test Long").

    No position vectors at all: head h adds ``-slope_h · distance(query, key)`` to its
    scores, so the further a key, the smaller its weight, and each head looks at its own
    range (slope 1/2 is nearly local, 1/256 nearly global). Because the penalty grows
    smoothly with distance, models trained on short sequences keep working on longer ones.

    The bias goes to `qkv.attention(..., bias=alibi(Tq, Tk))`, which adds it to the scaled
    scores, as in the paper. It is bottom-right aligned like qkv's causal mask: query i
    stands at key position i + Tk - Tq, so a single query against a KV cache of Tk keys
    gets the last row of the full (Tk, Tk) bias. The paper's models are causal and only
    see j <= i; for keys after the query the distance |i + Tk - Tq - j| is used, the usual
    symmetric extension for bidirectional attention.

    slopes: buffer (H,), float32, the paper's geometric sequence.

    Keep the bias in float32 (the default dtype) for bfloat16/float16 models: qkv.attention
    adds it to float32 scores anyway, and bfloat16 cannot hold -slope·distance at long
    distances (its spacing near 500 is 2, a whole score unit).

    Shapes: ``forward(Tq, Tk) -> (1, H, Tq, Tk)`` bias.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = _positive_int(num_heads, "num_heads")
        slopes = torch.tensor(_alibi_slopes(self.num_heads), dtype=torch.float32)  # (H,)
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, Tq: int, Tk: int, *, device=None, dtype=None) -> Tensor:
        """The (1, H, Tq, Tk) bias -slope_h·|(i + Tk - Tq) - j|, on `device` in `dtype`.

        device defaults to the module's, dtype to float32.
        """
        for name, value in (("Tq", Tq), ("Tk", Tk)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        device = self.slopes.device if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        query_pos = torch.arange(Tq, device=device) + (Tk - Tq)  # (Tq,) key index of query i
        key_pos = torch.arange(Tk, device=device)  # (Tk,)
        distance = (query_pos[:, None] - key_pos[None, :]).abs().to(compute)  # (Tq, Tk)
        slopes = self.slopes.to(device=device, dtype=compute)  # (H,)
        bias = -slopes[:, None, None] * distance[None, :, :]  # (H, Tq, Tk)
        return bias.unsqueeze(0).to(dtype)  # (1, H, Tq, Tk)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

"""The primitive masks: bands (causal, sliding window), key padding, packed documents, dense.

Letters: B batch, H heads, Tq query length, Tk key length, nq/nk number of query/key blocks.

Bottom-right alignment (what decoding with a KV cache needs): query i stands at key position
i + (Tk - Tq). With Tq = 3, Tk = 5 a causal mask is::

    keys →  0 1 2 3 4
    q0      ■ ■ ■ · ·
    q1      ■ ■ ■ ■ ·
    q2      ■ ■ ■ ■ ■

and with Tq = Tk it is the usual lower triangle. With Tq > Tk the first Tq - Tk queries
see nothing; qkv gives such rows output 0 (never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._base import Mask, _block_edges, kinds_from_dense, tile_kinds

__all__ = ["Band", "Dense", "Document", "Padding"]

_SMALL = 16  # masks whose data fits a 16×16 picture draw themselves in their repr


_kinds = tile_kinds


class Band(Mask):
    """Query i may attend to key j when -before <= j - (i + Tk - Tq) <= after.

    `None` means unbounded on that side: causal() is Band(None, 0).
    """

    def __init__(self, before: int | None, after: int | None, name: str) -> None:
        self.before, self.after, self.name = before, after, name
        self.form = "causal" if before is None and after == 0 else None

    def cache_key(self):
        return ("band", self.before, self.after)

    def mask_mod(self, Tq, Tk, device=None):
        shift, before, after = Tk - Tq, self.before, self.after

        def mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + shift)  # key position relative to the query's own
            allowed = rel <= after if after is not None else kv_idx >= 0
            return allowed if before is None else allowed & (rel >= -before)

        return mod

    def _offsets(self, Tq: int, Tk: int) -> tuple[float, float]:
        # Allowed keys of query i form the interval [i + lo, i + hi].
        shift = Tk - Tq
        lo = -float("inf") if self.before is None else shift - self.before
        hi = float("inf") if self.after is None else shift + self.after
        return lo, hi

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        lo, hi = self._offsets(Tq, Tk)
        i = torch.arange(q0, q1, device=device)[:, None]  # (q, 1)
        j = torch.arange(k0, k1, device=device)[None, :]  # (1, k)
        rel = j - i  # (q, k): key position relative to the query's own
        # integer comparisons only; an unbounded side is no comparison at all
        allowed = rel <= int(hi) if hi != float("inf") else torch.ones_like(rel, dtype=torch.bool)
        if lo != -float("inf"):
            allowed &= rel >= int(lo)
        return allowed[None, None]  # (1, 1, q, k)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        # the submask depends only on the tile's size and its offset from the diagonal
        lo, hi = self._offsets(Tq, Tk)
        return ("band", lo - (k0 - q0), hi - (k0 - q0), q1 - q0, k1 - k0)

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        lo, hi = self._offsets(Tq, Tk)
        q0, q1 = _block_edges(q0, q1, block_q, device)
        k0, k1 = _block_edges(k0, k1, block_k, device)
        q0, q1 = q0[:, None], q1[:, None] - 1  # (nq, 1), last query of each block
        k0, k1 = k0[None, :], k1[None, :] - 1  # (1, nk), last key of each block
        # The rows' intervals [i+lo, i+hi] slide by one per row, so their union over a
        # block is [q0+lo, q1+hi]: the tile is empty exactly when that misses [k0, k1].
        any_ = (k1 >= q0 + lo) & (k0 <= q1 + hi)
        # Full when even the most constrained rows cover the tile's keys.
        all_ = (k0 >= q1 + lo) & (k1 <= q0 + hi)
        return _kinds(any_, all_)[None, None]  # (1, 1, nq, nk)

    def __repr__(self) -> str:
        return self.name


def _int_tensor(x, name: str, ndim: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, Sequence) and not isinstance(x, str):
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a tensor or a sequence of ints; got {x!r}") from err
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of ints; got {type(x).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers; got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {tuple(t.shape)}")
    return t.long()


class Padding(Mask):
    """Key j of batch element b may be attended to when j < lengths[b]."""

    def __init__(self, lengths) -> None:
        self.lengths = _int_tensor(lengths, "lengths", 1)  # (B,)
        if self.lengths.numel() and int(self.lengths.min()) < 0:
            raise ValueError(f"padding lengths must be >= 0; got {self.lengths.tolist()[:16]}")
        self._keys: dict = {}  # (Tk, device) -> (B, 1, 1, Tk) bool, see key_mask
        self._longest = int(self.lengths.max()) if self.lengths.numel() else 0

    form = "key_padding"

    @property
    def key_lengths(self) -> torch.Tensor:
        return self.lengths

    def key_mask(self, Tk: int, device=None) -> torch.Tensor:
        """(B, 1, 1, Tk) bool, True for real keys: what torch's kernels broadcast.

        Kept on the mask (a few of the last sizes): one padding mask serves every layer
        of a model, and each step of a decoding loop that keeps its lengths.
        """
        key = (Tk, device)
        got = self._keys.get(key)
        if got is None:
            if self._longest > Tk:
                raise ValueError(
                    f"mask: padding lengths must lie in [0, Tk={Tk}]; got max length "
                    f"{self._longest}"
                )
            lengths = self.lengths.to(device)
            got = (torch.arange(Tk, device=device) < lengths[:, None])[:, None, None]
            if len(self._keys) >= 4:
                self._keys.pop(next(iter(self._keys)))
            self._keys[key] = got
        return got

    def mask_mod(self, Tq, Tk, device=None):
        lengths = self.lengths if device is None else self.lengths.to(device)
        return lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]

    @property
    def device(self):
        return self.lengths.device

    def check(self, B, H, Tq, Tk):
        n = self.lengths.shape[0]
        if n != B:
            raise ValueError(f"mask: padding has {n} lengths but the batch has B={B}")
        if n and int(self.lengths.max()) > Tk:
            raise ValueError(
                f"mask: padding lengths must lie in [0, Tk={Tk}]; got max length "
                f"{int(self.lengths.max())}"
            )

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        return ("padding", q1 - q0, k0, k1)  # the same for every block of queries

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        lengths = self.lengths.to(device) if device is not None else self.lengths
        j = torch.arange(k0, k1, device=lengths.device)  # (k,)
        keep = j[None, :] < lengths[:, None]  # (B, k)
        return keep[:, None, None, :].expand(-1, 1, q1 - q0, -1)  # (B, 1, q, k)

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        lengths = self.lengths.to(device) if device is not None else self.lengths
        k0, k1 = _block_edges(k0, k1, block_k, lengths.device)
        nq = -(-(q1 - q0) // block_q)
        any_ = k0[None, :] < lengths[:, None]  # (B, nk)
        all_ = k1[None, :] <= lengths[:, None]  # (B, nk)
        return _kinds(any_, all_)[:, None, None, :].expand(-1, 1, nq, -1)  # (B, 1, nq, nk)

    def __repr__(self) -> str:
        values = self.lengths.tolist()
        shown = values if len(values) <= 8 else [*values[:8], "..."]
        return f"padding(lengths={shown})".replace("'...'", "...")


# Exact tile classification for documents costs B·nq·nk·D (D distinct ids); above this
# budget we fall back on comparing each block's id range, which is sound but may call an
# empty tile partial (the kernel then finds its submask empty).
_PRESENCE_BUDGET = 1 << 26


class Document(Mask):
    """Query i of batch b may attend to key j when ids[b, i] == kv_ids[b, j].

    For packed sequences: several documents share one row of the batch and must not see
    each other. Combine with causal() for packed causal language modelling.
    """

    def __init__(self, ids, kv_ids=None) -> None:
        self.ids = _int_tensor(ids, "ids", 2)  # (B, Tq)
        self.kv_ids = self.ids if kv_ids is None else _int_tensor(kv_ids, "kv_ids", 2)
        if self.kv_ids.shape[0] != self.ids.shape[0]:
            raise ValueError(
                f"document: ids {tuple(self.ids.shape)} and kv_ids "
                f"{tuple(self.kv_ids.shape)} must have the same batch size"
            )

    @property
    def device(self):
        return self.ids.device

    def check(self, B, H, Tq, Tk):
        if tuple(self.ids.shape) != (B, Tq) or tuple(self.kv_ids.shape) != (B, Tk):
            raise ValueError(
                f"mask: document ids must be (B, Tq)={(B, Tq)} and kv_ids (B, Tk)={(B, Tk)}; "
                f"got {tuple(self.ids.shape)} and {tuple(self.kv_ids.shape)}"
            )

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        ids, kv_ids = self.ids[:, q0:q1], self.kv_ids[:, k0:k1]
        if device is not None:
            ids, kv_ids = ids.to(device), kv_ids.to(device)
        return (ids[:, :, None] == kv_ids[:, None, :])[:, None]  # (B, 1, q, k)

    def mask_mod(self, Tq, Tk, device=None):
        ids, kv_ids = self.ids, self.kv_ids
        if device is not None:
            ids, kv_ids = ids.to(device), kv_ids.to(device)

        def mod(b, h, q_idx, kv_idx):
            # clamped: a kernel may evaluate the padded end of its last block
            return ids[b, q_idx.clamp(0, Tq - 1)] == kv_ids[b, kv_idx.clamp(0, Tk - 1)]

        return mod

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        ids, kv_ids = self.ids[:, q0:q1], self.kv_ids[:, k0:k1]
        if device is not None:
            ids, kv_ids = ids.to(device), kv_ids.to(device)
        B = ids.shape[0]
        Tq, Tk = q1 - q0, k1 - k0
        nq, nk = -(-Tq // block_q), -(-Tk // block_k)
        qmin, qmax = _block_min_max(ids, block_q)  # (B, nq)
        kmin, kmax = _block_min_max(kv_ids, block_k)  # (B, nk)
        all_ = (qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
        all_ &= qmin[:, :, None] == kmin[:, None, :]  # (B, nq, nk): one shared document
        uniq, inverse = torch.unique(torch.cat([ids, kv_ids], 1), return_inverse=True)
        D = uniq.numel()
        if B * nq * nk * D <= _PRESENCE_BUDGET:
            # presence[b, block, d] = 1 when document d occurs in that block; a tile has an
            # allowed pair exactly when its query and key blocks share a document.
            pq = _presence(inverse[:, :Tq], block_q, nq, D)  # (B, nq, D)
            pk = _presence(inverse[:, Tq:], block_k, nk, D)  # (B, nk, D)
            any_ = (pq @ pk.transpose(1, 2)) > 0  # (B, nq, nk)
        else:
            any_ = (qmax[:, :, None] >= kmin[:, None, :]) & (kmax[:, None, :] >= qmin[:, :, None])
        return _kinds(any_, all_)[:, None]  # (B, 1, nq, nk)

    def __repr__(self) -> str:
        text = "document(ids)" if self.kv_ids is self.ids else "document(ids, kv_ids)"
        Tq, Tk = self.ids.shape[1], self.kv_ids.shape[1]
        if max(Tq, Tk) <= _SMALL:
            text += f"  # batch 0, {Tq}×{Tk}:\n" + self.draw(Tq, Tk)
        return text


def _block_min_max(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of (B, T) ids, padding the last block with its own values."""
    B, T = ids.shape
    n = -(-T // block)
    pad = n * block - T
    padded = torch.cat([ids, ids[:, -1:].expand(B, pad)], 1) if pad else ids
    blocks = padded.view(B, n, block)  # (B, n, block)
    return blocks.amin(-1), blocks.amax(-1)


def _presence(inverse: torch.Tensor, block: int, n: int, D: int) -> torch.Tensor:
    """(B, n, D) float: 1 where document d occurs in block n of row b."""
    B, T = inverse.shape
    which_block = torch.arange(T, device=inverse.device) // block  # (T,)
    flat = which_block[None, :] * D + inverse  # (B, T) index into n*D
    out = torch.zeros(B, n * D, device=inverse.device)
    out.scatter_(1, flat, 1.0)
    return out.view(B, n, D)


class Dense(Mask):
    """A bool tensor broadcastable to (B, H, Tq, Tk), True = may attend."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"from_dense expects a bool tensor; got {type(tensor).__name__}")
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"from_dense expects a bool tensor (True = may attend); got dtype "
                f"{tensor.dtype} with shape {tuple(tensor.shape)}"
            )
        if not 1 <= tensor.dim() <= 4:
            raise ValueError(
                f"from_dense expects 1 to 4 dimensions broadcastable to (B, H, Tq, Tk); "
                f"got shape {tuple(tensor.shape)}"
            )
        self.tensor = tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))

    form = "dense"

    def mask_mod(self, Tq, Tk, device=None):
        from ._flex import dense_mod

        t = self.tensor if device is None else self.tensor.to(device)
        return dense_mod(t)

    @property
    def device(self):
        return self.tensor.device

    def check(self, B, H, Tq, Tk):
        for got, want in zip(self.tensor.shape, (B, H, Tq, Tk), strict=True):
            if got not in (1, want):
                raise ValueError(
                    f"mask of shape {tuple(self.tensor.shape)} does not broadcast to "
                    f"(B, H, Tq, Tk)={(B, H, Tq, Tk)}"
                )

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        t = self.tensor
        t = t[:, :, q0:q1] if t.shape[2] != 1 else t
        t = t[:, :, :, k0:k1] if t.shape[3] != 1 else t
        t = t.expand(-1, -1, q1 - q0, k1 - k0)  # (Bm, Hm, q, k)
        return t if device is None else t.to(device)

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        t = self.tensor if device is None else self.tensor.to(device)
        t = t[:, :, q0:q1] if t.shape[2] != 1 else t
        t = t[:, :, :, k0:k1] if t.shape[3] != 1 else t
        nq, nk = -(-(q1 - q0) // block_q), -(-(k1 - k0) // block_k)
        return kinds_from_dense(t, block_q, block_k).expand(-1, -1, nq, nk)  # (Bm, Hm, nq, nk)

    def __repr__(self) -> str:
        shape = tuple(self.tensor.shape)
        text = f"from_dense(<bool {shape}>)"
        if max(shape[2], shape[3]) <= _SMALL:
            text += "  # [0, 0]:\n" + self.draw(shape[2], shape[3])
        return text

"""Up-front checks for ring attention: the local inputs, then one small collective.

Every rank validates its own shards; then all ranks exchange a few integers (shapes,
dtype, options) with one all_gather, so that shards of different lengths or heads, or a
rank that disagrees on causal/layout/padding, raise a clear ValueError on *every* rank
instead of a hang or a deep gloo/NCCL error in the middle of the ring. A rank whose local
check failed still takes part in the all_gather (flagged as failed), then raises its own
error, so its peers never wait for it.
"""

from __future__ import annotations

import numbers
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import masks
from .._validate import build_problem
from ..kernels import engine
from ..kernels.plan import TileConfig
from ._steps import Schedule, schedule
from .layout import check_layout

__all__ = ["RingSpec", "check_inputs", "group_ranks"]

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RingSpec:
    """A validated ring attention call (the same on every rank)."""

    B: int
    Hq: int
    Hkv: int
    S: int  # shard length: T = world · S
    D: int
    Dv: int
    causal: bool
    layout: str
    scale: float
    lengths: torch.Tensor | None  # (B,) int64 global key lengths, on q's device
    mask: masks.Mask | None  # over global (T, T) positions: causal, padding and mask= ANDed
    user_mask: masks.Mask | None  # mask= as given (for the cross-rank check)
    schedule: Schedule  # which blocks each rank needs, how many hops the ring runs
    engine: str  # the tile engine's executor: "fused" or "math"
    overlap: bool
    config: TileConfig
    direct: bool  # native code may read q, k, v's memory

    @property
    def group_size(self) -> int:
        return self.Hq // self.Hkv


def group_ranks(group) -> tuple[int, int, list[int]]:
    """(rank, world, the global ranks of the group in group-rank order)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ring_attention needs an initialised default process group: call "
            "torch.distributed.init_process_group(backend, rank=..., world_size=...) on "
            "every rank first (or launch with torchrun)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group passed")
    world = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    return rank, world, list(ranks)


def _lengths(padding, B: int, T: int, device) -> torch.Tensor | None:
    """padding -> (B,) int64 global key lengths in [0, T], or None."""
    if padding is None:
        return None
    if isinstance(padding, masks.Mask):
        if padding.form != "key_padding":
            raise TypeError(
                f"padding must be key lengths or qkv.masks.padding(lengths); got {padding!r} "
                "(other masks go to mask=)"
            )
        padding = padding.key_lengths
    if isinstance(padding, torch.Tensor):
        if padding.is_floating_point() or padding.dtype == torch.bool or padding.dim() != 1:
            raise TypeError(
                f"padding must be a 1-D integer tensor of key lengths (B,); got {padding.dtype} "
                f"of shape {tuple(padding.shape)}"
            )
        lengths = padding.to(device=device, dtype=torch.int64)
    else:
        values = list(padding)
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in values):
            raise TypeError(f"padding must be a sequence of int key lengths; got {values!r}")
        lengths = torch.tensor(values, dtype=torch.int64, device=device)
    if lengths.numel() != B:
        raise ValueError(f"padding has {lengths.numel()} key lengths but the batch has B={B}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(
            f"padding: key lengths are global and must lie in [0, T={T}] (T = world_size · "
            f"shard length); got {lengths.tolist()[:16]}"
        )
    return lengths


def _global_mask(mask, B: int, H: int, T: int) -> masks.Mask | None:
    """mask= as a qkv.masks mask over the global (T, T) positions, checked."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = masks.from_dense(mask)
    if not isinstance(mask, masks.Mask):
        raise TypeError(
            f"mask must be None or a qkv.masks mask over global positions; got "
            f"{type(mask).__name__}"
        )
    try:
        mask.check(B, H, T, T)
    except ValueError as err:
        raise ValueError(
            f"{err} (ring_attention: the mask is over the global sequence, T = world_size · "
            f"shard length = {T})"
        ) from None
    return mask


def _local(q, k, v, *, mask, causal, padding, layout, scale, overlap, config, world) -> RingSpec:
    p = build_problem(q, k, v, causal=causal, scale=scale)
    if p.Tq == 0:
        raise ValueError(f"ring_attention: the shards must not be empty; got q {tuple(q.shape)}")
    if p.Tq != p.Tk:
        raise ValueError(
            f"ring_attention shards the sequence of q, k and v alike: their lengths (dim -2) "
            f"must be equal on each rank; got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    layout = check_layout(layout)
    if layout == "zigzag" and p.Tq % 2:
        raise ValueError(
            f"layout='zigzag' needs the sequence length T = world_size · S divisible by "
            f"2·world_size (each shard holds two equal chunks); got shards of length S={p.Tq} "
            f"(q {tuple(q.shape)}) with world_size={world}"
        )
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool; got {type(overlap).__name__} {overlap!r}")
    config = TileConfig() if config is None else config
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a qkv.kernels.TileConfig; got {config!r}")
    T = world * p.Tq
    user_mask = _global_mask(mask, p.B, p.Hq, T)
    lengths = _lengths(padding, p.B, T, q.device)
    full = masks.combine(
        masks.causal() if causal else None,
        None if lengths is None else masks.padding(lengths),
        user_mask,
    )
    return RingSpec(
        B=p.B,
        Hq=p.Hq,
        Hkv=p.Hkv,
        S=p.Tq,
        D=p.D,
        Dv=p.Dv,
        causal=causal,
        layout=layout,
        scale=p.scale,
        lengths=lengths,
        mask=full,
        user_mask=user_mask,
        schedule=schedule(full, world, T, layout, q.device),
        engine=engine.choose(p),
        overlap=overlap,
        config=config,
        direct=p.direct,
    )


def _summary(spec: RingSpec | None, q) -> list[int]:
    """The integers every rank must agree on (first: 1 if the local check passed)."""
    if spec is None:
        return [0] * 14
    scale_bits = torch.tensor([spec.scale], dtype=torch.float64).view(torch.int64).item()
    lengths = spec.lengths
    pad = [-1, -1]
    if lengths is not None:
        weights = torch.arange(1, lengths.numel() + 1, device=lengths.device)
        pad = [int(lengths.sum()), int((lengths * weights).sum())]
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else len(_DTYPES)
    s = spec
    layout = int(s.layout == "zigzag")
    mask = 0 if s.user_mask is None else zlib.crc32(repr(s.user_mask).encode()) + 1
    return [1, s.B, s.Hq, s.Hkv, s.S, s.D, s.Dv, dtype, int(s.causal), layout, scale_bits, *pad,
            mask]  # fmt: skip


# the summary's fields: (name, first index, number of integers)
_FIELDS = (
    ("B", 1, 1), ("Hq", 2, 1), ("Hkv", 3, 1), ("S", 4, 1), ("D", 5, 1), ("Dv", 6, 1),
    ("dtype", 7, 1), ("causal", 8, 1), ("layout", 9, 1), ("scale", 10, 1), ("padding", 11, 2),
    ("mask", 13, 1),
)  # fmt: skip


def check_inputs(q, k, v, *, group, world, device, **options) -> RingSpec:
    """Validate locally, then check with one all_gather that all ranks agree."""
    spec, error = None, None
    try:
        spec = _local(q, k, v, world=world, **options)
    except (TypeError, ValueError) as e:
        error = e
    if world == 1:
        if error is not None:
            raise error
        return spec
    mine = torch.tensor(_summary(spec, q), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if error is not None:
        raise error
    rows = torch.stack(gathered).tolist()  # (world, 14)
    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:
        raise ValueError(
            f"ring_attention: rank(s) {failed} of the group got invalid inputs (their own "
            "error says why); every rank must call ring_attention with valid shards"
        )
    differ = [
        j
        for j, (_, at, n) in enumerate(_FIELDS)
        if len({tuple(row[at : at + n]) for row in rows}) > 1
    ]
    if differ:
        values = "; ".join(
            f"{_FIELDS[j][0]} ("
            + ", ".join(f"rank {r}: {_show(j, row)}" for r, row in enumerate(rows))
            + ")"
            for j in differ
        )
        shapes = "; ".join(
            f"rank {r}: q (B={row[1]}, Hq={row[2]}, S={row[4]}, D={row[5]}), "
            f"k/v (Hkv={row[3]}, S={row[4]}, Dv={row[6]})"
            for r, row in enumerate(rows)
        )
        raise ValueError(
            f"ring_attention: every rank must hold shards of one shape and pass the same "
            f"options (all slices equally long); differing across ranks: {values}. "
            f"Shards: {shapes}"
        )
    return spec


def _show(j: int, row: list[int]):
    """A readable value of field j from one rank's summary row."""
    name, at, _ = _FIELDS[j]
    value = row[at]
    if name == "dtype":
        return str(_DTYPES[value]) if value < len(_DTYPES) else "other"
    if name == "causal":
        return bool(value)
    if name == "layout":
        return "zigzag" if value else "contiguous"
    if name == "scale":
        return torch.tensor([value], dtype=torch.int64).view(torch.float64).item()
    if name == "padding":
        return "none" if row[11] < 0 else f"lengths summing to {row[11]}"
    if name == "mask":
        return "none" if value == 0 else f"mask #{value:x}"
    return value

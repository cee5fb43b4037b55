"""How a sequence is cut into per-rank shards for ring attention, and put back together.

Letters: W world size (ranks in the ring), r a rank, T the global sequence length,
S = T / W the length of one shard, c = T / (2W) the length of one zigzag chunk.

Two layouts:

- "contiguous": rank r holds positions [r·S, (r+1)·S), the layout of the contract.
  With causal attention rank r needs the keys of ranks 0..r only, so the last rank does
  W times the work of the first and the ring runs at the speed of the slowest rank.
- "zigzag": the sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r
  (one early, one late), so every rank does the same causal work. Striped Attention
  (Brandon et al. 2023) balances the causal ring by striping tokens round-robin; the
  zigzag split (used by Llama 3 context parallelism and ring-flash-attention) balances
  it just as well with two contiguous chunks, which keeps each tile a dense block.

For W = 2, T = 8 (c = 2)::

    position      0 1 2 3 4 5 6 7
    contiguous    0 0 0 0 1 1 1 1      rank 0: [0 1 2 3]   rank 1: [4 5 6 7]
    zigzag        0 0 1 1 1 1 0 0      rank 0: [0 1 6 7]   rank 1: [2 3 4 5]

Within a shard the positions increase with the local index in both layouts, which is what
lets the ring run the diagonal step (a rank's queries against its own keys) as one plain
causal block.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["LAYOUTS", "chunk_ranges", "positions", "shard", "unshard"]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def _check_int(x, name: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(x).__name__} {x!r}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}; got {x}")
    return int(x)


def _check_split(seq_len: int, world_size: int, layout: str, what: str) -> None:
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % parts:
        how = f"2·world_size = {parts} chunks" if layout == "zigzag" else f"{parts} shards"
        raise ValueError(
            f"{what}: layout={layout!r} cuts the sequence into {how}, so its length must be "
            f"divisible by {parts}; got length {seq_len} with world_size={world_size}"
        )


def chunk_ranges(
    rank: int, world_size: int, seq_len: int, *, layout: str = "contiguous"
) -> list[tuple[int, int]]:
    """Global [start, stop) position ranges of rank's shard, in the order the shard stores them."""
    layout = check_layout(layout)
    world_size = _check_int(world_size, "world_size", 1)
    rank = _check_int(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}); got {rank}")
    seq_len = _check_int(seq_len, "seq_len", 0)
    _check_split(seq_len, world_size, layout, "chunk_ranges")
    if layout == "contiguous":
        S = seq_len // world_size
        return [(rank * S, (rank + 1) * S)]
    c = seq_len // (2 * world_size)
    late = 2 * world_size - 1 - rank
    return [(rank * c, (rank + 1) * c), (late * c, (late + 1) * c)]


def positions(
    rank: int, world_size: int, seq_len: int, *, layout: str = "contiguous", device=None
) -> torch.Tensor:
    """(S,) int64 global positions of rank's shard, e.g. for rotary embeddings in zigzag."""
    ranges = chunk_ranges(rank, world_size, seq_len, layout=layout)
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int; got {type(dim).__name__} {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(
    x: torch.Tensor, rank: int, world_size: int, *, layout: str = "contiguous", dim: int = -2
) -> torch.Tensor:
    """Rank's shard of the full sequence x along dim (T -> S = T / world_size); differentiable.

    The contiguous layout returns a view; zigzag concatenates its two chunks (a copy).
    """
    x = _check_tensor(x, "x")
    dim = _check_dim(x, dim, "x")
    T = x.shape[dim]
    try:
        ranges = chunk_ranges(rank, world_size, T, layout=layout)
    except ValueError as e:
        raise ValueError(f"shard: x of shape {tuple(x.shape)}, dim={dim}: {e}") from None
    pieces = [x.narrow(dim, a, b - a) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def unshard(
    shards: Sequence[torch.Tensor] | torch.Tensor,
    *,
    layout: str = "contiguous",
    dim: int = -2,
    world_size: int | None = None,
) -> torch.Tensor:
    """The full sequence back from the shards of every rank; the inverse of `shard`.

    Args:
        shards: a list of the W shards in rank order (each (..., S, ...) along dim), or one
            tensor holding them concatenated along dim in rank order (what an all_gather
            into one buffer gives), in which case world_size is required.
        layout: the layout the shards were cut with.
        dim: the sequence dimension.
        world_size: the number of shards in a concatenated tensor.

    Returns:
        (..., T, ...) with T = W·S, positions in global order.
    """
    layout = check_layout(layout)
    if isinstance(shards, torch.Tensor):
        if world_size is None:
            raise ValueError("unshard: pass world_size= when shards is one concatenated tensor")
        world_size = _check_int(world_size, "world_size", 1)
        d = _check_dim(shards, dim, "shards")
        if shards.shape[d] % world_size:
            raise ValueError(
                f"unshard: shards of shape {tuple(shards.shape)} has length {shards.shape[d]} "
                f"along dim={dim}, not divisible by world_size={world_size}"
            )
        shards = list(shards.chunk(world_size, d))
    else:
        shards = list(shards)
        if not shards:
            raise ValueError("unshard: shards is empty")
        for i, s in enumerate(shards):
            _check_tensor(s, f"shards[{i}]")
        if world_size is not None and world_size != len(shards):
            raise ValueError(f"unshard: got {len(shards)} shards but world_size={world_size}")
        d = _check_dim(shards[0], dim, "shards[0]")
        shapes = {tuple(s.shape) for s in shards}
        if len(shapes) != 1:
            raise ValueError(f"unshard: all shards must have one shape; got {sorted(shapes)}")
    if layout == "contiguous":
        return torch.cat(shards, d)
    S = shards[0].shape[d]
    if S % 2:
        raise ValueError(
            f"unshard: layout='zigzag' shards hold two equal chunks, so their length must be "
            f"even; got {S} along dim={dim}"
        )
    # rank r holds chunks r and 2W-1-r: the early halves in rank order, then the late
    # halves in reverse rank order
    early = [s.narrow(d, 0, S // 2) for s in shards]
    late = [s.narrow(d, S // 2, S // 2) for s in reversed(shards)]
    return torch.cat(early + late, d)

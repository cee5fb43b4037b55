"""qkv.distributed: attention over sequences sharded across processes, and DDP helpers.

    import torch.distributed as dist, qkv.distributed as qd
    dist.init_process_group("gloo")                       # or launch with torchrun
    r, W = dist.get_rank(), dist.get_world_size()
    q_r = qd.shard(q, r, W, layout="zigzag")               # (B, Hq, T, D) -> (B, Hq, T/W, D)
    k_r, v_r = qd.shard(k, r, W, layout="zigzag"), qd.shard(v, r, W, layout="zigzag")
    out_r = qd.ring_attention(q_r, k_r, v_r, causal=True, layout="zigzag")
    # == qd.shard(qkv.attention(q, k, v, causal=True), r, W, layout="zigzag")

`ring_attention` passes key/value blocks around the ring of ranks, overlapped with the
attention of the block in hand (Liu et al. 2023); see docs/ring.md for when it pays.
`qkv.distributed.ddp` holds the helpers a training loop needs under torchrun, and
`run_local` runs a function on a few local processes (tests, benchmarks).
"""

from . import ddp
from .launch import run_local
from .layout import LAYOUTS, chunk_ranges, positions, shard, unshard
from .ring import RingStats, ring_attention

__all__ = [
    "LAYOUTS",
    "RingStats",
    "chunk_ranges",
    "ddp",
    "positions",
    "ring_attention",
    "run_local",
    "shard",
    "unshard",
]

"""Data-parallel training helpers: one script that runs alone or under torchrun unchanged.

    from qkv.distributed import ddp
    info = ddp.setup_from_env()                 # reads torchrun's RANK/WORLD_SIZE/...; 1 process
    model = ddp.wrap(model)                     # DistributedDataParallel when W > 1, else as is
    for step in range(steps):
        idx = ddp.shard_indices(len(data), shuffle=True, seed=0, epoch=step)
        loss = ...; loss.backward()             # DDP averages the gradients across ranks
        mean_loss = ddp.all_reduce_mean(loss.detach())
        if info.is_main: print(step, mean_loss)
    if info.is_main: torch.save(ddp.unwrap(model).state_dict(), path)
    ddp.barrier(); ddp.cleanup()

Every helper is a no-op (or the identity) when no process group is initialised, so the
same code runs as one plain process. With DistributedDataParallel every rank must run the
same number of backward passes (each one all-reduces the gradients), which is why
`shard_indices` gives every rank exactly as many samples, like torch's DistributedSampler.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "info",
    "setup_from_env",
    "shard_indices",
    "unwrap",
    "wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank r of world_size, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes files and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """The current DistInfo (rank 0 of 1 when no process group is initialised)."""
    if not _active():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int; got {raw!r}") from None


def setup_from_env(
    backend: str | None = None, *, timeout: datetime.timedelta | None = None
) -> DistInfo:
    """Initialise the default process group from torchrun's environment; return DistInfo.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them
    (or with WORLD_SIZE=1) nothing is initialised and DistInfo() (rank 0 of 1) is returned,
    so a plain `python -m qkv demo` runs as before. backend defaults to "nccl" when CUDA is
    available, else "gloo"; on CUDA each process takes the GPU of its LOCAL_RANK.
    """
    if _active():
        return info()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun "
            "--nproc-per-node N, or set them (e.g. MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local)


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if _active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active() and dist.get_world_size() > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, **ddp_options) -> torch.nn.Module:
    """DistributedDataParallel(model) when W > 1 (on this rank's GPU under CUDA), else model.

    DDP broadcasts rank 0's parameters at construction, so every rank starts from the
    same weights even if they were initialised with different seeds.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not (_active() and dist.get_world_size() > 1):
        return model
    if next(model.parameters()).device.type == "cuda":
        ddp_options.setdefault("device_ids", [torch.cuda.current_device()])
    return torch.nn.parallel.DistributedDataParallel(model, **ddp_options)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (what to save: its state_dict has no 'module.')."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_indices(
    n: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[int]:
    """This rank's share of range(n): every rank gets ceil(n / W) indices, disjoint when
    W divides n (else the first few repeat, as in torch's DistributedSampler).

    With shuffle, all ranks draw the same permutation from (seed, epoch) and take every
    W-th element of it, so the shards of one epoch cover the data once.
    """
    here = info()
    rank = here.rank if rank is None else rank
    world_size = here.world_size if world_size is None else world_size
    for name, value in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"shard_indices: {name} must be an int; got {type(value).__name__} {value!r}"
            )
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard_indices: need n >= 0 and 0 <= rank < world_size; got "
            f"n={n}, rank={rank}, world_size={world_size}"
        )
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    total = -(-n // world_size) * world_size  # n rounded up to a multiple of W
    padded = (order * -(-total // n))[:total] if n else []
    return padded[rank::world_size]


def all_reduce_mean(value):
    """The mean of a number or tensor over all ranks (the value itself in one process).

    Returns the same kind it was given: a float for a Python number, a tensor (floating,
    of the input's dtype when it is floating) for a tensor.
    """
    if not (_active() and dist.get_world_size() > 1):
        return value
    is_tensor = isinstance(value, torch.Tensor)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        t = t.cuda()
    dtype = t.dtype if t.is_floating_point() else torch.float32  # a mean of ints is a float
    t = t.to(torch.float64 if dtype == torch.float64 else torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / dist.get_world_size()
    if is_tensor:
        return t.to(dtype=dtype, device=value.device)
    return float(t)


def broadcast_object(obj, src: int = 0):
    """rank src's obj on every rank (e.g. a vocabulary or config built on rank 0)."""
    if not (_active() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

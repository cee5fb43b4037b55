"""Kernels behind `qkv.attention`, and the dispatch that picks one.

Every kernel takes the same validated `Problem` and returns an `AttentionOutput`; each may
declare, through `unsupported(problem)`, why it cannot run a problem. `select` walks the
kernels from fastest to most general and returns the first that can, with the reason.
The checks only read the problem and the state of the machine: none builds, compiles or
loads anything (the native kernel is built on its first real call, or by
`native.build()`; FlexAttention compiles on its first call), so `qkv.explain` is cheap.

Kernels: "native" (float32 CPU forwards in C++), "fused" (torch's SDPA as it stands),
"flex" (structured masks on CUDA, torch's compiled FlexAttention), "tiled" (the tile
engine: structured masks, lse, bias, dropout, weights without gradients), "reference"
(the readable oracle, runs everything). Common calls (no mask, causal, key padding)
skip the walk altogether: see `_validate.quick_sdpa`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._types import AttentionOutput, Problem
from . import flex, fused, native, reference, tiled
from .plan import TileConfig, TilePlan

__all__ = ["KERNELS", "KernelChoice", "TileConfig", "TilePlan", "select"]


@dataclass(frozen=True)
class Kernel:
    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Problem], AttentionOutput]
    unsupported: Callable[..., str | None]
    builds: bool = False  # unsupported takes build= (False: never compile to answer)

    def why_not(self, p: Problem, build: bool) -> str | None:
        return self.unsupported(p, build=build) if self.builds else self.unsupported(p)


# From fastest to most general; the reference kernel runs everything.
KERNELS: dict[str, Kernel] = {
    "native": Kernel("native", native.run, native.unsupported, builds=True),
    "fused": Kernel("fused", fused.run, fused.unsupported),
    "flex": Kernel("flex", flex.run, flex.unsupported),  # CUDA: structured masks
    "tiled": Kernel("tiled", tiled.run, tiled.unsupported),
    "reference": Kernel("reference", reference.run, lambda p: None),
}


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs a call and why (see `qkv.explain`)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def select(p: Problem, kernel: str = "auto", *, build: bool = True) -> KernelChoice:
    """Pick the kernel for a problem; `kernel` forces one (ValueError if it cannot run it).

    build=True lets the native kernel's check build it (right before a call that runs
    it); build=False (`qkv.explain`) compiles nothing and counts a kernel not built yet
    as one that can run, since the call would build it.
    """
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str ('auto' or a kernel name); got {kernel!r}")
    if kernel != "auto":
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}; got {kernel!r}")
        why_not = KERNELS[kernel].why_not(p, build)
        if why_not is not None:
            raise ValueError(f"kernel={kernel!r} cannot run this call: {why_not}")
        return KernelChoice(kernel, "forced by kernel=")
    skipped = []
    for name, k in KERNELS.items():
        why_not = k.why_not(p, build)
        if why_not is None:
            reason = "fastest kernel that supports this call"
            if skipped:
                reason += " (" + "; ".join(skipped) + ")"
            return KernelChoice(name, reason)
        skipped.append(f"not {name}: {why_not}")
    raise AssertionError("the reference kernel supports every call")

"""Tile plans as values: a mask's tiles for given sizes, built once and reused.

Letters: B batch, H heads, Tq/Tk lengths, bq/bk tile sizes, nq/nk numbers of tiles.

    plan = qkv.masks.window(255).plan(T, T)     # or TilePlan(mask, T, T, TileConfig(...))
    print(plan)                                 # the tile map: what is skipped, masked, full
    for layer in layers:                        # one plan for every layer of that size
        out = qkv.attention(q, k, v, mask=plan)

A `TilePlan` is what FlexAttention's `create_block_mask` returns as a `BlockMask`: which
tiles are empty (skipped), full (computed without a mask) or partial (with a small
submask), computed from the mask's own tile classification. It is itself a mask (it
allows what its mask allows), so it can be passed wherever a mask can. The batched jobs
the engine runs (and their native-kernel masks) are derived from it on first use and kept
inside it, so whoever holds the plan holds everything derived from it; the tiled kernel
keeps the plans of tensor-free masks in a `PlanCache`, keyed by value (`Mask.cache_key`,
sizes, config, device).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..masks import FULL, Mask
from .tiles import Job, QueryBlock, compact_keys, group_jobs, plan_tiles, refine_jobs
from .tiles import steps as job_steps

__all__ = ["Jobs", "PlanCache", "TileConfig", "TilePlan"]


@dataclass(frozen=True)
class TileConfig:
    """Tile and job sizes of the tile engine (measured with benchmarks/tile_sizes.py on a
    2-core CPU, fp32, D=64, T=16384: windows of 256 and 1024 keys, 4 causal documents,
    causal with lse, float32 forward jobs on the native kernel)."""

    # 256 × 256 was within ~10% of the fastest forward in every workload but the 1024-key
    # window (95 ms against 77 with 64 × 64 tiles), and the fastest or within 7%
    # forward+backward, where small tiles lose (the backward recomputes each overlapping
    # key span: 561 ms with 64 × 64 tiles against 420 for that window). Re-measured with
    # the AVX2 build of the native kernel (docs/bench/2026-12-01-tile-sizes-zen4-avx2-build.md):
    # the same picture (1024-key window 142 ms against 113 forward, 554 against 533
    # forward+backward; 32-row sub-blocks fastest again), so both ISAs share the defaults.
    block_q: int = 256
    block_k: int = 256
    # Rows of the sub-blocks masked blocks are cut into, each reading only the keys its
    # rows see: a 256-key window took 35 / 25 / 27 / 32 / 40 ms with 16 / 32 / 64 / 128 /
    # 256 (= unrefined) rows; the other workloads moved by less than the noise (±10%).
    refine_rows: int = 32
    # A run of full tiles longer than this many keys is computed without a mask; a shorter
    # one joins its partial neighbours in one masked segment (fewer calls, no merges).
    max_masked_full: int = 1024
    # Sub-block key spans are widened (with masked keys) to a multiple of this: one call
    # over 512 sub-blocks of 32 rows took 40.7 ms on 287 keys and 34.6 ms on 288.
    span_multiple: int = 16
    # Refine a job only when its sub-blocks skip at least this fraction of its keys.
    refine_saving: float = 0.25
    # A job gathers copies of its keys and values, n · keys token-heads: this bounds the
    # copy (and the job's float mask) to a few tens of MB at D = 64.
    job_tokens: int = 1 << 18

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "refine_rows", "max_masked_full", "span_multiple",
                     "job_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TileConfig: {name} must be an int >= 1; got {value!r}")
        if not 0.0 <= self.refine_saving <= 1.0:
            raise ValueError(
                f"TileConfig: refine_saving must lie in [0, 1]; got {self.refine_saving}"
            )


DEFAULT = TileConfig()

# A plan keeps its whole dense submask (what the fused kernel takes for small problems)
# up to this many pairs: 1 MB of bools.
_KEEP_DENSE = 1 << 20


@dataclass
class Jobs:
    """The batched jobs of a plan for one head count (see tiles.group_jobs): `coarse` for
    the backward, `fine` (refined sub-blocks) for the forward, `keys` the key positions
    they read when compacted (None: all). Per-ordinal idle rows and per-job native masks
    are filled in on first use."""

    coarse: list[Job]
    fine: list[Job]
    keys: torch.Tensor | None
    idle: dict = field(default_factory=dict)  # ordinal -> rows no job writes, or None
    native: dict = field(default_factory=dict)  # index in fine -> (steps, mask_t)

    def idle_rows(self, ordinal: int, T: int, device) -> torch.Tensor | None:
        """(T,) bool rows that no forward job of `ordinal` writes, None when there are none."""
        if ordinal not in self.idle:
            covered = torch.zeros(T, dtype=torch.bool)
            for job in self.fine:
                if job.ordinal == ordinal:
                    starts = torch.tensor(job.q_starts)[:, None]
                    covered[(starts + torch.arange(job.rows)).flatten()] = True
            self.idle[ordinal] = None if bool(covered.all()) else (~covered).to(device)
        return self.idle[ordinal]

    def native_job(self, i: int):
        """(steps, additive mask transposed (Bm, n|1, Hm, k, rp) float32 or None) of fine
        job i, as the native kernel reads it (rp = rows rounded up to 16)."""
        got = self.native.get(i)
        if got is None:
            job = self.fine[i]
            steps, mask_t = job_steps(job), None
            allowed = job_mask(job) if steps is not None else None  # (Bm, n|1, Hm, r, k)
            if allowed is not None:
                rp = -(-job.rows // 16) * 16
                shape = (*allowed.shape[:3], job.keys, rp)
                mask_t = torch.zeros(shape, dtype=torch.float32, device="cpu")
                inside = mask_t[..., : job.rows]
                inside.masked_fill_(~allowed.transpose(-1, -2).cpu(), float("-inf"))
            got = self.native[i] = (steps, mask_t)
        return got


def job_mask(job: Job) -> torch.Tensor | None:
    """The job's bool mask as (Bm, n|1, Hm, r, k): one pattern if all blocks share it."""
    if job.masks is None:
        return None
    first = job.masks[0]  # (Bm, Hm, r, k)
    if all(m is first or torch.equal(m, first) for m in job.masks[1:]):
        return first[:, None]  # (Bm, 1, Hm, r, k)
    return torch.stack(job.masks, dim=1)  # (Bm, n, Hm, r, k)


class TilePlan(Mask):
    """The tiles of `mask` (None: no mask) for a (Tq, Tk) problem under `config`.

    `blocks` lists each block of queries with its key segments: full (no mask) or masked
    (a (Bm, Hm, q, k) bool submask); empty tiles have none. As a mask it allows what
    `mask` allows; the tiled kernel runs it as it stands when sizes and config match.
    """

    def __init__(self, mask: Mask | None, Tq: int, Tk: int, config: TileConfig | None = None,
                 *, device=None) -> None:  # fmt: skip
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"TilePlan: mask must be a qkv.masks mask or None; got {mask!r}")
        for name, size in (("Tq", Tq), ("Tk", Tk)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"TilePlan: {name} must be an int >= 0; got {size!r}")
        config = DEFAULT if config is None else config
        if not isinstance(config, TileConfig):
            raise TypeError(f"TilePlan: config must be a TileConfig; got {config!r}")
        self.mask, self.Tq, self.Tk, self.config = mask, Tq, Tk, config
        self.form = None if mask is None else mask.form
        self.blocks: list[QueryBlock] = plan_tiles(
            mask, Tq, Tk, config.block_q, config.block_k, device,
            max_masked_full=config.max_masked_full,
        )  # fmt: skip
        self._jobs: dict = {}
        self._dense: dict = {}  # device -> the whole (Bm, Hm, Tq, Tk) submask, when small
        self._lock = threading.Lock()

    def jobs(self, heads: int, compact: bool, device=None) -> Jobs:
        """The batched jobs for `heads` query heads; `compact` copies only the keys read."""
        key = (heads, compact, str(device))
        got = self._jobs.get(key)
        if got is None:
            c = self.config
            coarse = group_jobs(self.blocks, heads, job_tokens=c.job_tokens)
            keys = None
            if compact:
                keys, coarse = compact_keys(coarse, self.Tk, device=device)
            Tk = self.Tk if keys is None else len(keys)
            # the forward runs narrow sub-blocks; the backward keeps whole blocks, since
            # torch's fused backward gives every (overlapping) key window its own
            # zero-filled dk/dv buffer, which narrow blocks multiply
            fine = refine_jobs(coarse, Tk, c.refine_rows, span_multiple=c.span_multiple,
                               saving=c.refine_saving)  # fmt: skip
            with self._lock:
                got = self._jobs.setdefault(key, Jobs(coarse, fine, keys))
        return got

    def __getstate__(self) -> dict:  # picklable (sent to spawned ranks): no lock, no jobs
        return {**self.__dict__, "_lock": None, "_jobs": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def matches(self, Tq: int, Tk: int, config: TileConfig) -> bool:
        return (self.Tq, self.Tk, self.config) == (Tq, Tk, config)

    # ---- the mask it plans --------------------------------------------------------------

    def _inner(self) -> Mask:
        return _ALL if self.mask is None else self.mask

    def check(self, B, H, Tq, Tk):
        if (Tq, Tk) != (self.Tq, self.Tk):
            raise ValueError(
                f"mask: this tile plan is for (Tq, Tk)={(self.Tq, self.Tk)}; the call has "
                f"(Tq, Tk)={(Tq, Tk)} (build one plan per size)"
            )
        if self.mask is not None:
            self.mask.check(B, H, Tq, Tk)

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        if (q0, q1, k0, k1) != (0, Tq, 0, Tk) or Tq * Tk > _KEEP_DENSE:
            return self._inner().submask(Tq, Tk, q0, q1, k0, k1, device)
        # the whole (small) matrix, as the fused kernel takes it: kept, like the jobs
        got = self._dense.get(device)
        if got is None:
            got = self._dense[device] = self._inner().submask(Tq, Tk, 0, Tq, 0, Tk, device)
        return got

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        return self._inner().region_kinds(Tq, Tk, q0, q1, k0, k1, block_q, block_k, device)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        return self._inner().tile_key(Tq, Tk, q0, q1, k0, k1)

    def cache_key(self):
        return self._inner().cache_key()

    def mask_mod(self, Tq, Tk, device=None):
        return self._inner().mask_mod(Tq, Tk, device)

    @property
    def key_lengths(self):
        return None if self.mask is None else self.mask.key_lengths

    def key_mask(self, Tk, device=None):
        return None if self.mask is None else self.mask.key_mask(Tk, device)

    @property
    def device(self):
        return None if self.mask is None else self.mask.device

    # ---- the tile map -------------------------------------------------------------------

    def tile_map(self) -> list[list[str]]:
        """One character per (block_q × block_k) tile: ■ full, ◩ masked, · skipped."""
        bk = self.config.block_k
        nk = -(-self.Tk // bk)
        rows = []
        for blk in self.blocks:
            row = ["·"] * nk
            for seg in blk.segments:
                for j in range(seg.k0 // bk, -(-seg.k1 // bk)):
                    row[j] = "■" if seg.mask is None else "◩"
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        grid = self.tile_map()
        flat = [c for row in grid for c in row]
        c = self.config
        head = (
            f"TilePlan({self.mask!r}, Tq={self.Tq}, Tk={self.Tk}, tiles {c.block_q}×{c.block_k}: "
            f"{flat.count('■')} full, {flat.count('◩')} masked, {flat.count('·')} skipped)"
        )
        if not grid or len(grid) > 64 or len(grid[0]) > 64:
            return head
        return head + "\n" + "\n".join(" ".join(row) for row in grid)


class _All(Mask):
    """Every pair allowed: what a plan of no mask stands for."""

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        return torch.ones(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        nq, nk = -(-(q1 - q0) // block_q), -(-(k1 - k0) // block_k)
        return torch.full((1, 1, nq, nk), FULL, dtype=torch.int8, device=device)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        return ("all", q1 - q0, k1 - k0)

    def cache_key(self):
        return ("all",)

    def mask_mod(self, Tq, Tk, device=None):
        return lambda b, h, q_idx, kv_idx: kv_idx >= 0

    def __repr__(self) -> str:
        return "all"


_ALL = _All()


class PlanCache:
    """The last `size` plans of tensor-free masks, keyed by value: (mask.cache_key(), Tq,
    Tk, config, device). Planning a 16,384-token window (tile kinds, segments, jobs,
    sub-blocks) took ~5 ms of a ~35 ms forward; masks that hold tensors (padding,
    documents) are planned on every call, or once by whoever holds their plan."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._plans: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, mask: Mask | None, Tq: int, Tk: int, config: TileConfig, device) -> TilePlan:
        if mask is not None:
            plan = mask if isinstance(mask, TilePlan) else None
            if plan is not None and plan.matches(Tq, Tk, config):
                return plan
            if plan is not None:
                mask = plan.mask
        value = ("none",) if mask is None else mask.cache_key()
        if value is None:
            return TilePlan(mask, Tq, Tk, config, device=device)
        key = (value, Tq, Tk, config, str(device))
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        plan = TilePlan(mask, Tq, Tk, config, device=device)  # two threads may both build
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

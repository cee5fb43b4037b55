"""Tile plans: which (query block × key range) pieces of the score matrix need computing.

Letters: B batch, H heads, Tq/Tk lengths, bq/bk block sizes, nq/nk numbers of blocks.

A mask classifies every (bq × bk) tile as EMPTY, FULL or PARTIAL (`Mask.block_kinds`).
For each block of queries the plan keeps maximal runs of neighbouring key blocks of the
same kind: a FULL run becomes one segment computed without any mask, a PARTIAL run one
segment with a small bool mask, and EMPTY tiles are skipped. The segments of a query block
cover disjoint keys, so their partial results merge exactly through the log-sum-exp:

    lse = logaddexp(lse₁, lse₂),   out = out₁·exp(lse₁ − lse) + out₂·exp(lse₂ − lse)

Tile kinds are aggregated over batch and heads (a tile is FULL only if it is full for every
sequence and head), so masks that differ per sequence (padding, documents) still produce
one plan; their segments carry a (Bm, Hm, q, k) mask that broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import EMPTY, FULL, PARTIAL, Mask

__all__ = [
    "Job",
    "QueryBlock",
    "Segment",
    "compact_keys",
    "group_jobs",
    "plan_tiles",
    "refine_jobs",
    "steps",
]


@dataclass(frozen=True)
class Segment:
    """Keys [k0, k1) for one query block; `mask` (Bm, Hm, q, k) bool, None when full."""

    k0: int
    k1: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class QueryBlock:
    """Queries [q0, q1) and the key segments they attend to (none: every row is empty)."""

    q0: int
    q1: int
    segments: tuple[Segment, ...]


def _runs(kinds: list[int], block_k: int, max_masked_full: int) -> list[tuple[int, int, int]]:
    """Segments (start, end, kind) of one row of tiles: a run of full tiles longer than
    `max_masked_full` keys stays mask-free, shorter ones join their partial neighbours
    (see TileConfig.max_masked_full)."""
    same: list[list[int]] = []  # maximal runs [start, end, kind] of one kind
    for j, kind in enumerate(kinds):
        if same and same[-1][2] == kind:
            same[-1][1] = j + 1
        else:
            same.append([j, j + 1, kind])
    segments: list[tuple[int, int, int]] = []
    open_start = None  # start of the masked segment being built
    open_end = 0
    open_kinds: set[int] = set()

    def close() -> None:
        if open_start is not None:
            kind = FULL if open_kinds == {FULL} else PARTIAL
            segments.append((open_start, open_end, kind))

    for start, end, kind in same:
        if kind == EMPTY or (kind == FULL and (end - start) * block_k > max_masked_full):
            close()
            open_start, open_kinds = None, set()
            if kind == FULL:
                segments.append((start, end, FULL))
            continue
        if open_start is None:
            open_start = start
        open_end = end
        open_kinds.add(kind)
    close()
    return segments


def plan_tiles(
    mask: Mask | None,
    Tq: int,
    Tk: int,
    block_q: int,
    block_k: int,
    device=None,
    *,
    max_masked_full: int = 1024,
) -> list[QueryBlock]:
    """Cut the (Tq, Tk) problem into query blocks and key segments (see module docstring)."""
    nq = -(-Tq // block_q)
    if mask is None:
        whole = (Segment(0, Tk, None),) if Tk > 0 else ()
        return [QueryBlock(i * block_q, min((i + 1) * block_q, Tq), whole) for i in range(nq)]

    kinds = mask.block_kinds(Tq, Tk, block_q, block_k, device)  # (Bm, Hm, nq, nk)
    kinds = kinds.flatten(0, 1)  # (Bm·Hm, nq, nk)
    all_empty = (kinds == EMPTY).all(0)  # (nq, nk): skip only if empty everywhere
    all_full = (kinds == FULL).all(0)  # (nq, nk): unmasked only if full everywhere
    merged = torch.where(all_empty, EMPTY, torch.where(all_full, FULL, 1)).tolist()

    blocks = []
    seen: dict = {}  # tile key -> (submask, any row allowed, every row allowed)
    for i in range(nq):
        q0, q1 = i * block_q, min((i + 1) * block_q, Tq)
        segments = []
        for j0, j1, kind in _runs(merged[i], block_k, max_masked_full):
            k0, k1 = j0 * block_k, min(j1 * block_k, Tk)
            if kind == FULL:
                segments.append(Segment(k0, k1, None))
                continue
            key = mask.tile_key(Tq, Tk, q0, q1, k0, k1)
            if key is None or key not in seen:
                sub = mask.submask(Tq, Tk, q0, q1, k0, k1, device)  # (Bm, Hm, q, k)
                row_any = sub.any(-1)  # (Bm, Hm, q)
                entry = (sub, bool(row_any.any()))
                if key is not None:
                    seen[key] = entry  # equal patterns share one tensor (see stacked.py)
            else:
                entry = seen[key]
            sub, some = entry
            if not some:
                continue  # the classification was conservative: nothing here after all
            segments.append(Segment(k0, k1, sub))
        blocks.append(QueryBlock(q0, q1, tuple(segments)))
    return blocks


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Job:
    """Segments of several query blocks that one fused call computes side by side.

    Block i covers queries [q_starts[i], q_starts[i] + rows) against keys
    [k_starts[i], k_starts[i] + keys); each block appears at most once in a job, so their
    results can be merged back into the output without collisions. `masks` holds one
    (Bm, Hm, rows, keys) bool tensor per block, or is None for full segments.
    """

    ordinal: int  # which segment of its query blocks (0 = the first one)
    q_starts: tuple[int, ...]
    k_starts: tuple[int, ...]
    rows: int
    keys: int
    masks: tuple[torch.Tensor, ...] | None


def steps(job: Job) -> tuple[int, int] | None:
    """(query step, key step) between consecutive blocks of a regular job, or None.

    Regular jobs have evenly spaced query blocks that do not overlap (q_i = q_0 + i·sq,
    sq ≥ rows) and key spans shifting by a constant sk ≥ 0: for a sliding window
    sq = sk = rows; sk = 0 when every block reads the same keys. stacked.py runs them on
    strided views.
    """
    n, r = len(job.q_starts), job.rows
    if n == 1:
        return r, r
    sq, sk = job.q_starts[1] - job.q_starts[0], job.k_starts[1] - job.k_starts[0]
    regular = (
        sq >= r
        and sk >= 0
        and all(
            job.q_starts[i] == job.q_starts[0] + i * sq
            and job.k_starts[i] == job.k_starts[0] + i * sk
            for i in range(n)
        )
    )
    return (sq, sk) if regular else None


def group_jobs(plan: list[QueryBlock], heads: int, *, job_tokens: int = 1 << 18) -> list[Job]:
    """Batch the plan's segments into jobs of equal shape (one fused call each).

    Jobs come sorted by ordinal, and the jobs of one ordinal never share a query block.

    A sliding window cut into 64-row blocks has hundreds of identical segments; running
    them as one call instead of hundreds removes the per-call cost, which dominates at
    this size (measured: 0.3 ms per call against ~0.05 ms of arithmetic per tile).
    """
    groups: dict[tuple[int, int, int, bool], list[tuple[int, Segment]]] = {}
    for blk in plan:
        for ordinal, seg in enumerate(blk.segments):
            key = (ordinal, blk.q1 - blk.q0, seg.k1 - seg.k0, seg.mask is not None)
            groups.setdefault(key, []).append((blk.q0, seg))
    jobs = []
    for (ordinal, rows, keys, masked), items in sorted(groups.items(), key=lambda kv: kv[0][0]):
        per_job = max(1, job_tokens // max(1, keys * heads))
        for start in range(0, len(items), per_job):
            chunk = items[start : start + per_job]
            jobs.append(
                Job(
                    ordinal=ordinal,
                    q_starts=tuple(q0 for q0, _ in chunk),
                    k_starts=tuple(seg.k0 for _, seg in chunk),
                    rows=rows,
                    keys=keys,
                    masks=tuple(seg.mask for _, seg in chunk) if masked else None,
                )
            )
    return jobs


def compact_keys(jobs: list[Job], Tk: int, device=None) -> tuple[torch.Tensor | None, list[Job]]:
    """The key positions the jobs read, and the jobs renumbered onto them.

    A query block against a long KV cache (decoding with a sliding window) reads a few
    hundred of many thousand keys; copying just those into the kernel's layout costs far
    less than converting the whole cache. Returns (None, jobs) when the jobs read every key.
    """
    covered = torch.zeros(Tk, dtype=torch.bool)
    for job in jobs:
        for k0 in set(job.k_starts):
            covered[k0 : k0 + job.keys] = True
    if bool(covered.all()):
        return None, jobs
    positions = covered.nonzero().flatten()  # (U,) sorted
    rank = torch.cumsum(covered, 0) - 1  # position -> index among the kept keys
    renumbered = [
        Job(
            ordinal=job.ordinal,
            q_starts=job.q_starts,
            k_starts=tuple(int(rank[k0]) for k0 in job.k_starts),
            rows=job.rows,
            keys=job.keys,
            masks=job.masks,
        )
        for job in jobs
    ]
    return positions.to(device), renumbered


def refine_jobs(
    jobs: list[Job], Tk: int, rows: int = 32, *, span_multiple: int = 16, saving: float = 0.25
) -> list[Job]:
    """Cut the query blocks of masked jobs into sub-blocks of `rows` rows, each reading
    only the span of keys its rows may see.

    A 256-row block of a sliding window reads w + 256 keys though each row needs w; its
    32-row sub-blocks read w + 32. Sub-blocks that sit at the same place in every block
    of a job form a job of their own; when every sub-block has the same span length and
    pattern, and the blocks are evenly spaced, they make one job again (one fused call).
    Jobs whose blocks do not share one mask tensor, or that would skip less than `saving`
    of their keys, are kept; spans are widened to a multiple of `span_multiple` keys (see
    TileConfig).
    """
    out: list[Job] = []
    for job in jobs:
        out.extend(_refine(job, rows, Tk, span_multiple, saving))
    return out


def _widen(
    lo: list[int], hi: list[int], low: int, high: int, multiple: int
) -> tuple[list[int], list[int]]:
    """Spans [lo, hi) grown to a multiple of `multiple` inside [low, high), all on the
    same side (so that evenly shifted spans stay evenly shifted); unchanged if no side fits."""
    want = [-(-(h - a) // multiple) * multiple for a, h in zip(lo, hi, strict=True)]
    if all(a + w <= high for a, w in zip(lo, want, strict=True)):
        return lo, [a + w for a, w in zip(lo, want, strict=True)]
    if all(h - w >= low for h, w in zip(hi, want, strict=True)):
        return [h - w for h, w in zip(hi, want, strict=True)], hi
    return lo, hi


def _refine(job: Job, rows: int, Tk: int, multiple: int, saving: float) -> list[Job]:
    r, k = job.rows, job.keys
    if job.masks is None or r <= rows or r % rows:
        return [job]
    pattern = job.masks[0]  # (Bm, Hm, r, k)
    if any(m is not pattern for m in job.masks[1:]):
        return [job]
    m = r // rows
    seen = pattern.flatten(0, 1).any(0).view(m, rows, k).any(1)  # (m, k): keys a sub-block reads
    live = seen.any(1).tolist()
    lo = seen.int().argmax(1).tolist()
    hi = (k - seen.flip(1).int().argmax(1)).tolist()
    needed = sum(h - lo_ for h, lo_, a in zip(hi, lo, live, strict=True) if a) * rows
    if needed > (1 - saving) * r * k:
        return [job]
    n = len(job.q_starts)
    low, high = -min(job.k_starts), Tk - max(job.k_starts)  # keys that exist, relative
    kept = [s for s in range(m) if live[s]]  # other sub-blocks see nothing: rows stay empty
    starts, ends = _widen([lo[s] for s in kept], [hi[s] for s in kept], low, high, multiple)
    pieces = []  # one job per live sub-block position
    for s, a, b in zip(kept, starts, ends, strict=True):
        # keys outside the segment belong to other segments (or none): masked here
        sub = pattern.new_zeros(*pattern.shape[:2], rows, b - a)
        sub[..., lo[s] - a : hi[s] - a] = pattern[:, :, s * rows : (s + 1) * rows, lo[s] : hi[s]]
        pieces.append(
            Job(
                ordinal=job.ordinal,
                q_starts=tuple(q0 + s * rows for q0 in job.q_starts),
                k_starts=tuple(k0 + a for k0 in job.k_starts),
                rows=rows,
                keys=b - a,
                masks=(sub,) * n,
            )
        )
    return _interleave(pieces) or pieces


def _interleave(pieces: list[Job]) -> list[Job] | None:
    """The pieces as one job, when they make a regular one (see `steps`): the sub-blocks
    of every block in order, with equal spans and patterns."""
    if not pieces:
        return None
    first = pieces[0]
    if any(p.keys != first.keys or not torch.equal(p.masks[0], first.masks[0]) for p in pieces):
        return None
    n = len(first.q_starts)
    order = [(p.q_starts[i], p.k_starts[i]) for i in range(n) for p in pieces]
    joined = Job(
        ordinal=first.ordinal,
        q_starts=tuple(q for q, _ in order),
        k_starts=tuple(k for _, k in order),
        rows=first.rows,
        keys=first.keys,
        masks=(first.masks[0],) * len(order),
    )
    return [joined] if steps(joined) is not None else None

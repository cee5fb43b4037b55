"""The harness around a target: its inputs, its reference and how it is called.

Letters: N batch, H heads, Lq/Lk lengths, D head dim, E model width.
Functions get q (N, H, Lq, D), k and v (N, H, Lk, D) — squeezed to the layout they take —
and are compared with `qkv.attention` on the same tensors. Modules get x (N, L, E) (or
three such inputs when they take (q, k, v)) and are compared with the attention computed
from their own weights (`weights.module_reference`).
"""

from __future__ import annotations

import torch

from .loader import CheckError, learner_line
from .target import WIDTH, Result, Target, to_float64
from .weights import attend, collect, module_reference, roles, scores

__all__ = ["Harness"]

N, H, LQ, LK, D = 2, 2, 5, 7, 8  # function inputs: Tq != Tk, Lk != D (outputs and weights
L = 6  # differ in shape); modules: L divisible by the heads
FUNCTION_LAYOUTS = ("NLD", "NHLD", "LD")
MODULE_LAYOUTS = ("NLE", "LE")


def randn(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class Harness:
    """A target with its layout found, its weights in float64 and its mask convention."""

    def __init__(self, target: Target):
        self.t = target
        self.named = None
        self.projs = []
        self.orient = 0
        self.width = WIDTH
        self.causal = False  # the target is causal by itself (detected)
        if target.is_module:
            if target.lazy:
                self._init_lazy()
            to_float64(target.obj)
            self.projs = collect(target.obj)
            self.named = roles(self.projs)
            if self.named:
                first = self.named.get("q") or self.named.get("qkv")
                self.width = first.in_dim
                v = self.named.get("v") or self.named.get("qkv") or self.named.get("kv")
                ev = v.out_dim // (3 if "qkv" in self.named else 2 if "kv" in self.named else 1)
                o = self.named.get("o")
                self.t.out_width = o.out_dim if o else ev
        self._discover()

    # ---- inputs -------------------------------------------------------------------------

    def inputs(self, seed: int = 1, lq: int | None = None, lk: int | None = None) -> list:
        """Canonical inputs: [q, k, v] (N, H, L, D) for functions, [xq, xk, xv] for modules."""
        n, h = self.t.canonical_shape(N, H)
        if self.t.is_module:  # (N, L, E): self-attention has Lq = Lk = L
            xq = randn(n, L, self.width, seed=seed)
            if self.t.takes_x:
                return [xq, xq, xq]
            return [
                xq,
                randn(n, L, self.width, seed=seed + 1),
                randn(n, L, self.width, seed=seed + 2),
            ]
        lq = lq or (L if self.causal else LQ)
        lk = lk or (L if self.causal else LK)
        return [
            randn(n, h, lq, D, seed=seed),
            randn(n, h, lk, D, seed=seed + 1),
            randn(n, h, lk, D, seed=seed + 2),
        ]

    def lengths(self, inputs) -> tuple[int, int]:
        return inputs[0].shape[-2], inputs[1].shape[-2]

    # ---- reference ----------------------------------------------------------------------

    @property
    def has_reference(self) -> bool:
        return not self.t.is_module or self.named is not None

    def reference(self, inputs, keep=None, causal=False, variant="ref"):
        """(out, weights) in the learner's layout; weights canonical (N, H, Lq, Lk)."""
        causal = causal or self.causal
        if self.t.is_module:
            out, w = module_reference(
                self.named, self.t.heads, *inputs, keep, causal, variant, self.orient
            )
            return self.t.squeeze(out), w
        out, w = attend(*inputs, keep, causal, variant)
        return self.t.squeeze(out), w

    def weight_candidates(self, w: torch.Tensor) -> list[torch.Tensor]:
        """The reference weights in every shape a learner may return them."""
        if not self.t.is_module:
            return [self.t.squeeze(w)]
        cands = [w, w.mean(1)]
        if w.shape[1] == 1:
            cands.append(w[:, 0])
        if self.t.layout == "LE":
            cands = [c[0] for c in cands]
        return cands

    # ---- calling ------------------------------------------------------------------------

    def call(self, inputs, keep=None, causal=None, seed=0) -> Result:
        try:
            return self.t.call(inputs, keep, causal, seed)
        except Exception as e:
            raise CheckError(self._why(e)) from None

    def _why(self, e: Exception) -> str:
        line = learner_line(e, self.t.path) if self.t.path else None
        where = f" (line {line})" if line else ""
        message = str(e).splitlines()[0] if str(e) else ""
        return f"calling {self.t.name} raised {type(e).__name__}: {message}{where}"

    def _init_lazy(self) -> None:
        """Lazy modules (nn.LazyLinear) learn their sizes from a first call."""
        x = randn(N, L, WIDTH, seed=0).float()
        try:
            self.t.obj(x)
        except Exception as e:
            raise CheckError(self._why(e)) from None

    def _discover(self) -> None:
        """Find the framework and layout the target takes: the first that runs and gives an
        output of the right shape (or, failing that, the first that runs)."""
        layouts = MODULE_LAYOUTS if self.t.is_module else FUNCTION_LAYOUTS
        first_error, ran = None, None
        for framework in self.t.frameworks:
            for layout in layouts:
                self.t.framework, self.t.layout = framework, layout
                for no_mask in ("none", "all") if self.t.mask_param else ("none",):
                    self.t.no_mask = no_mask
                    try:
                        x = self.inputs()
                        r = self.t.call(x)
                    except Exception as e:
                        first_error = first_error or e
                        continue
                    if r.out is not None and self.shape_ok(r.out.shape, self.t.expected_out(x)):
                        if self.t.is_module and self.named:
                            self._orientation(x, r)
                        return
                    ran = ran or (framework, layout, no_mask)
                    break
        if ran:
            self.t.framework, self.t.layout, self.t.no_mask = ran
            return
        raise CheckError(self._why(first_error))

    def _orientation(self, x, r: Result) -> None:
        """Raw weight matrices: y = x W or y = x Wᵀ, whichever the learner's output matches."""
        if all(p.linear for p in self.named.values()):
            return
        errs = []
        for orient in (0, 1):
            self.orient = orient
            try:
                out, _ = self.reference(x)
                errs.append(float((out - r.out).abs().max()))
            except RuntimeError:
                errs.append(float("inf"))
        self.orient = int(errs[1] < errs[0])

    @staticmethod
    def shape_ok(got, want) -> bool:
        got, want = tuple(got), tuple(want)
        if len(got) != len(want):
            return False
        return all(w is None or g == w for g, w in zip(got, want, strict=True))

    def tol(self, ref: torch.Tensor) -> float:
        finite = ref[torch.isfinite(ref)]
        return 1e-5 * (1.0 + (float(finite.abs().max()) if finite.numel() else 0.0))

    def big_inputs(self, target_score: float, one_row: bool) -> tuple[list, float]:
        """Inputs whose scores reach `target_score`: all equal (one_row False), or only in
        row 0 of each matrix (one_row True, the other rows O(1))."""
        h = self
        x = h.inputs(seed=11)
        if not self.t.is_module:
            q, k, v = x
            d = q.shape[-1]
            if one_row:
                k0 = k[..., :1, :]
                c = target_score * d**0.5 / (k0 * k0).sum(-1, keepdim=True)
                q = q.clone()
                q[..., :1, :] = c * k0
            else:
                u = randn(d, seed=12)
                u = u / u.norm() * d**0.5
                q = (target_score / d**0.5) * u.expand_as(q).clone()
                k = u.expand_as(k).clone()
            return [q, k, v], target_score
        x0, score = self._big_token(target_score)
        base = x[0].clone()
        if one_row:
            base[0, 0] = x0
        else:
            base[:] = x0
        return [base, base, base] if self.t.takes_x else [base, x[1], x[2]], score

    def _big_token(self, target_score: float) -> tuple[torch.Tensor, float]:
        h = self
        if not h.named:
            return 100.0 * randn(h.width, seed=13), float("nan")
        best, best_s = None, -float("inf")
        for seed in range(13, 33):
            x0 = randn(h.width, seed=seed)
            s = float(scores(h.named, h.t.heads, x0.view(1, 1, -1), h.orient).max())
            if s > best_s:
                best, best_s = x0, s
        for e in range(0, 60):
            c = 2 ** (e / 4)
            s = float(scores(h.named, h.t.heads, (c * best).view(1, 1, -1), h.orient).max())
            if s >= target_score:
                return c * best, s
        return c * best, s

    # ---- dependence -----------------------------------------------------------------------

    def dependence(self, inputs, keep=None, causal=None) -> torch.Tensor:
        """(Lq, Lk) float: how much output row i changes when key/value position j changes
        (0 where it does not depend on j; inf where the output is not finite).

        Functions: k and v at j are perturbed. Modules: the key and value inputs at j
        (x at j for self-attention; there row i = j is left out, its query changed too).
        """
        base = self.call(inputs, keep, causal).out
        lq, lk = self.lengths(inputs)
        dep = torch.zeros(lq, lk, dtype=torch.float64)
        for j in range(lk):
            moved = [t.clone() for t in inputs]
            for idx in (1, 2) if not (self.t.is_module and self.t.takes_x) else (0,):
                moved[idx][..., j, :] += 1.0
            if self.t.is_module and self.t.takes_x:
                moved = [moved[0]] * 3
            out = self.call(moved, keep, causal).out
            delta = (out - base).abs().nan_to_num(float("inf"))
            delta = delta.reshape(-1, lq, delta.shape[-1]).amax(dim=(0, 2))
            dep[:, j] = torch.where(delta <= 1e-9 * (1 + float(base.abs().max())), 0.0, delta)
        return dep

    def find_convention(self) -> str | None:
        """Which mask polarity the target uses, from what its output depends on under a
        partial mask: "keep" (1/True = may attend), "masked", "additive" (a float mask added
        to the scores: 0 = may attend, -inf = hidden), "ignored" or "odd"."""
        x = self.inputs(seed=3)
        lq, lk = self.lengths(x)
        shapes = ("full", "heads1", "plain", "keys") if self.t.is_module else ("full", "plain")
        error = None
        for shape in shapes:
            self.t.mask_shape = shape
            keep = self.pattern(lq, lk)
            try:
                self.t.call(x, keep)
                break
            except Exception as e:
                error = error or e
        else:
            raise CheckError(self._why(error))
        dep = self.dependence(x, keep) > 0
        off = torch.ones(lq, lk, dtype=torch.bool)
        if self.t.is_module and self.t.takes_x:
            off &= ~torch.eye(lq, lk, dtype=torch.bool)
        if (dep == keep)[off].all():
            return "keep"
        if (dep == ~keep)[off].all():
            self.t.convention = "masked"
            return "masked"
        self.t.convention = "additive"  # BERT's attention_mask: scores + mask
        try:
            if ((self.dependence(x, keep) > 0) == keep)[off].all():
                return "additive"
        except CheckError:
            pass
        self.t.convention = "keep"
        return "ignored" if dep[off].all() else "odd"

    def pattern(self, lq: int, lk: int) -> torch.Tensor:
        """The partial keep mask for this target: rows all equal for a key padding mask."""
        keep = pattern(lq, lk)
        return keep[:1].expand(lq, lk).clone() if self.t.mask_shape == "keys" else keep


def pattern(lq: int, lk: int) -> torch.Tensor:
    """A partial (Lq, Lk) keep mask: every row keeps and hides keys under either polarity,
    the diagonal is kept, and it is not symmetric."""
    for seed in range(100):
        keep = randn(lq, lk, seed=seed) > 0
        if lq == lk:
            keep |= torch.eye(lq, dtype=torch.bool)
        rows_ok = ((keep.sum(-1) >= 2) & ((~keep).sum(-1) >= 2)).all()
        if rows_ok and (lq != lk or not torch.equal(keep, keep.T)):
            return keep
    raise AssertionError("no mask pattern")

"""The probes: each exposes one classic mistake and decides pass / fail / skip.

How each decides (docs/check.md has the same list for learners):
- shape: the output is (..., Lq, Dv) (modules: (N, L, E_out)), the weights (..., Lq, Lk).
- dropout-in-eval: two calls on the same inputs, random state left alone, differ by > 1e-12.
- shared-projection: adding noise to one q/k/v projection's weights leaves the output
  unchanged (to 1e-12): that layer is never used.
- heads-split-on-sequence: permuting the tokens of a non-causal multi-head module does not
  permute its output the same way (beyond tolerance).
- unstable-softmax: every score equal to ~1500: the output has inf/NaN, qkv's does not.
- global-max-softmax: one query row with scores up to ~1000, the others O(1): other rows
  are inf/NaN (or wrong, where the plain inputs were right).
- masked-row-uniform: a query row with every key masked comes out as the mean of the values.
- future-leak: asked to be causal, an output row changes when a later position changes.
- reference: the output (and weights) match qkv within 1e-5·(1 + max|ref|); when not, the
  variants no-scaling, scale-after-softmax, softmax-axis are tried before `wrong-output`.
"""

from __future__ import annotations

import re

import torch

from .harness import Harness, L
from .lines import LINES, SourceLines
from .loader import CheckError
from .report import IDS, Check, CheckReport, Finding
from .target import Target
from .weights import perturbed

__all__ = ["run"]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = (a - b).abs().nan_to_num(float("inf"))
    return float(d.max()) if d.numel() else 0.0


class _Run:
    def __init__(self, target: Target, source_obj):
        self.t = target
        self.h = Harness(target)
        self.checks: dict[str, tuple[str, str]] = {i: ("skip", "") for i in IDS}
        self.findings: dict[str, Finding] = {}
        self.wrong_hints: list[str] = []
        self.wrong_data: dict = {}
        self.lines = SourceLines(target.source_lines(), source_obj)

    # ---- bookkeeping --------------------------------------------------------------------

    def ok(self, fid: str) -> None:
        if self.checks[fid][0] != "fail":
            self.checks[fid] = ("pass", "")

    def skip(self, fid: str, why: str) -> None:
        if self.checks[fid][0] != "fail":
            self.checks[fid] = ("skip", why)

    def fail(self, fid: str, data: dict, line: int | None = None) -> None:
        self.checks[fid] = ("fail", "")
        if fid not in self.findings:
            self.findings[fid] = Finding(fid, data, line or self.line_of(fid))

    def line_of(self, fid: str, regex: str | None = None) -> int | None:
        return self.lines.find(regex or LINES.get(fid))

    # ---- the probes -------------------------------------------------------------------------

    def run(self) -> CheckReport:
        h, t = self.h, self.t
        convention = h.find_convention() if t.mask_param else None
        self.convention = convention if convention in ("keep", "masked", "additive") else None
        if convention in ("ignored", "odd"):
            self.wrong_hints.append("mask_ignored" if convention == "ignored" else "mask_odd")
        self.detect_causal()
        if self.shape():
            self.dropout()
            self.base_match = self.reference_matches(h.inputs())
            probes = {
                "shared-projection": self.projections,
                "heads-split-on-sequence": self.permutation,
                "unstable-softmax": self.unstable,
                "global-max-softmax": self.global_max,
                "masked-row-uniform": self.masked_row,
                "future-leak": self.future_leak,
            }
            for fid, probe in probes.items():
                try:
                    probe()
                except CheckError:  # e.g. causal=True refused: that probe cannot run
                    self.skip(fid, "call_raised")
            self.reference()
        else:
            for fid in IDS[1:]:
                self.skip(fid, "shape_failed")
        checks = tuple(Check(i, *self.checks[i]) for i in IDS)
        findings = tuple(self.findings[i] for i in IDS if i in self.findings)
        return CheckReport(t.name, findings, checks, t.describe(), self.convention)

    def detect_causal(self) -> None:
        """A target causal by itself (a tril buffer): the reference is then causal too."""
        if self.t.causal_param or self.t.mask_param:
            return
        x = self.h.inputs(lq=L, lk=L)
        dep = self.h.dependence(x) > 0
        upper = torch.ones(L, L, dtype=torch.bool).triu(1)
        lower = torch.ones(L, L, dtype=torch.bool).tril(-1)
        self.h.causal = not dep[upper].any() and bool(dep[lower].any())

    def shape(self) -> bool:
        h = self.h
        x = h.inputs()
        r = h.call(x)
        want = self.t.expected_out(x)
        if r.out is None or not h.shape_ok(r.out.shape, want):
            got = " and ".join(str(s) for s in r.raw_shapes) or "nothing"
            shown = tuple("E" if w is None else w for w in want)
            self.fail("shape", {"what": "output", "got": got, "want": str(shown)})
            return False
        if r.weights is not None and h.has_reference:
            _, w = h.reference(x)
            cands = h.weight_candidates(w)
            if not any(c.shape == r.weights.shape for c in cands):
                want_w = str(tuple(cands[0].shape))
                self.fail(
                    "shape", {"what": "weights", "got": str(tuple(r.weights.shape)), "want": want_w}
                )
                return False
        self.ok("shape")
        return True

    def dropout(self) -> None:
        x = self.h.inputs()
        a, b = self.h.call(x, seed=None).out, self.h.call(x, seed=None).out
        err = _err(a, b)
        if err > 1e-12 * (1 + float(a.abs().nan_to_num(0).max())):
            self.fail("dropout-in-eval", {"err": err})
        else:
            self.ok("dropout-in-eval")

    def reference_matches(self, x, keep=None) -> bool:
        if not self.h.has_reference:
            return False
        r = self.h.call(x, keep)
        ref, w = self.h.reference(x, keep)
        return _err(r.out, ref) <= self.h.tol(ref) and self._weights_err(r, w) <= 1e-5

    def _weights_err(self, r, w) -> float:
        if r.weights is None:
            return 0.0
        return min(_err(r.weights, c) for c in self.h.weight_candidates(w))

    def projections(self) -> None:
        """shared-projection: noise on one projection's weights must change the output."""
        h = self.h
        if not self.t.is_module:
            return self.skip("shared-projection", "not_module")
        if not h.named:
            return self.skip("shared-projection", "no_weights")
        x = h.inputs(seed=5)
        base = h.call(x).out
        tiny = 1e-12 * (1 + float(base.abs().nan_to_num(0).max()))
        unused = []
        for p in h.projs:
            blocks = {"qkv": "qkv", "kv": "kv"}.get(p.role, p.role or "")
            for i, role in enumerate(blocks):
                with perturbed(p, i, len(blocks), h.orient):
                    changed = _err(h.call(x).out, base) > tiny
                if not changed:
                    unused.append((p, role))
        for p, role in unused:
            if role == "o":
                self.wrong_hints.append("unused")
                self.wrong_data["name"] = p.name
        qkv_unused = [(p, role) for p, role in unused if role != "o"]
        if qkv_unused:
            names = ", ".join(dict.fromkeys(p.name for p, _ in qkv_unused))
            roles = ",".join(role for _, role in qkv_unused)
            line = self._reuse_line(h.named, qkv_unused[0][0])
            self.fail("shared-projection", {"name": names, "role": roles}, line)
        self.ok("shared-projection")

    def _reuse_line(self, named, unused) -> int | None:
        q = named.get("q") or named.get("qkv")
        if q is None:
            return None
        qname = re.escape(q.name.split(".")[0])
        reuse = rf"\b(k|key|keys|v|value|values)\w*\s*=.*\b{qname}\b|({qname}\b.*){{2}}"
        return self.line_of("", reuse) or self.line_of(
            "", rf"\b{re.escape(unused.name.split('.')[0])}\b"
        )

    def permutation(self) -> None:
        h = self.h
        if not self.t.is_module or h.t.heads < 2:
            return self.skip(
                "heads-split-on-sequence", "not_module" if not self.t.is_module else "one_head"
            )
        if h.causal:
            return self.skip("heads-split-on-sequence", "causal")
        if "dropout-in-eval" in self.findings:  # the dropout pattern does not move with tokens
            return self.skip("heads-split-on-sequence", "explained")
        x = h.inputs(seed=7)[0]
        perm = torch.tensor([1, 4, 0, 5, 2, 3])
        base = h.call([x, x, x]).out.index_select(-2, perm)
        xp = x.index_select(-2, perm)
        got = h.call([xp, xp, xp]).out
        err = _err(got, base)
        if err > h.tol(base):
            self.fail("heads-split-on-sequence", {"n": L, "err": err, "heads": h.t.heads})
        else:
            self.ok("heads-split-on-sequence")

    def unstable(self) -> None:
        x, score = self.h.big_inputs(1500.0, one_row=False)
        out = self.h.call(x).out
        bad = int((~torch.isfinite(out)).sum())
        ref_finite = not self.h.has_reference or bool(torch.isfinite(self.h.reference(x)[0]).all())
        if bad and ref_finite:
            self.fail("unstable-softmax", {"score": score, "bad": bad, "total": out.numel()})
        else:
            self.ok("unstable-softmax")

    def global_max(self) -> None:
        h = self.h
        x, score = self.h.big_inputs(1000.0, one_row=True)
        out = h.call(x).out
        lq = out.shape[-2]
        rows = out.reshape(-1, lq, out.shape[-1])
        other = torch.ones(rows.shape[:2], dtype=torch.bool)
        other[0, 0] = False
        if not self.t.is_module:
            other[:, 0] = False  # functions: row 0 of every matrix holds the large scores
        bad_rows = ~torch.isfinite(rows).all(-1)
        err = float("nan")
        if h.has_reference:
            ref = h.reference(x)[0].reshape(rows.shape)
            dev = (rows - ref).abs().nan_to_num(float("inf")).amax(-1)
            err = float(dev[other].max())
            if self.base_match:
                bad_rows |= dev > h.tol(ref)
        bad = int((bad_rows & other).sum())
        if bad:
            self.fail(
                "global-max-softmax",
                {"score": score, "bad": bad, "rows": int(other.sum()), "err": err},
            )
        else:
            self.ok("global-max-softmax")

    def masked_row(self) -> None:
        h = self.h
        if not self.t.mask_param:
            return self.skip("masked-row-uniform", "no_mask")
        if not self.convention:
            return self.skip("masked-row-uniform", "unknown_convention")
        if not h.has_reference:
            return self.skip("masked-row-uniform", "no_weights")
        if self.convention == "additive":  # the fill value is the caller's, not the code's
            return self.skip("masked-row-uniform", "additive_mask")
        x = h.inputs(seed=9)
        lq, lk = h.lengths(x)
        keep = h.pattern(lq, lk)
        keep[0] = False
        if self.t.mask_shape == "keys":
            keep[:] = False  # a padding mask hides keys from every query
        out = h.call(x, keep).out[..., 0, :]
        ref = h.reference(x, keep)[0][..., 0, :]
        alt = h.reference(x, keep, variant="masked-row-uniform")[0][..., 0, :]
        tol = h.tol(ref)
        if not torch.isfinite(out).all():
            self.wrong_hints.append("nan_row")
        elif _err(out, ref) > tol and _err(out, alt) <= tol:
            self.fail("masked-row-uniform", {"lk": lk, "w": 1 / lk, "err": _err(out, alt)})
        self.ok("masked-row-uniform")

    def future_leak(self) -> None:
        h, t = self.h, self.t
        says_causal = re.search(r"causal|decoder|masked", t.name, re.I)
        x = h.inputs(lq=L, lk=L)
        keep, causal = None, None
        if t.causal_param:
            causal, how = True, f"{t.causal_param}=True"
        elif t.mask_param and self.convention and t.mask_shape == "keys":
            return self.skip("future-leak", "padding_mask")
        elif t.mask_param and self.convention:
            keep, how = torch.ones(L, L, dtype=torch.bool).tril(), "a causal mask"
        elif says_causal or h.causal:
            how = "its name says so"
        else:
            return self.skip("future-leak", "no_causal")
        dep = h.dependence(x, keep, causal)
        leaks = (dep > 0) & torch.ones(L, L, dtype=torch.bool).triu(1)
        if leaks.any():
            i, j = (int(v) for v in leaks.nonzero()[0])
            return self.fail("future-leak", {"i": i, "j": j, "delta": float(dep[i, j]), "how": how})
        self.ok("future-leak")
        if h.has_reference and not self.findings:  # no leak, but is it causal attention?
            out = h.call(x, keep, causal).out
            ref = h.reference(x, keep, causal=True)[0]
            if _err(out, ref) > h.tol(ref):
                self.wrong_hints.append("causal_differs")
                self.wrong_data.update(how=how, cerr=_err(out, ref))

    def reference(self) -> None:
        """wrong-output and the pitfalls told apart by the formula the output matches."""
        h = self.h
        diag = ("wrong-output", "no-scaling", "scale-after-softmax", "softmax-axis")
        if not h.has_reference:
            for fid in diag:
                self.skip(fid, "no_weights")
            return
        calls = [(h.inputs(), None)]
        if self.convention:
            x = h.inputs(seed=3)
            calls.append((x, h.pattern(*h.lengths(x))))
        for x, keep in calls:
            r = h.call(x, keep)
            ref, w = h.reference(x, keep)
            err, werr, tol = _err(r.out, ref), self._weights_err(r, w), h.tol(ref)
            if err > tol or werr > 1e-5:
                self._diagnose(x, keep, r, err, werr, tol)
                break
        for fid in diag[1:]:
            self.ok(fid)
        if self.wrong_hints and "wrong-output" not in self.findings:
            self.fail("wrong-output", {"err": None, "hints": self.wrong_hints, **self.wrong_data})
        if self.checks["wrong-output"] != ("skip", "explained"):
            self.ok("wrong-output")

    def _diagnose(self, x, keep, r, err, werr, tol) -> None:
        h = self.h
        variants = ["no-scaling", "scale-after-softmax", "softmax-axis", "softmax-axis-unscaled"]
        if self.t.is_module:
            variants += ["shared-projection", "width-scale"]
        d = x[0].shape[-1] if not self.t.is_module else h.width // h.t.heads
        if err <= tol and self._weights_only(r, d, err):
            return
        for variant in variants:
            out, w = h.reference(x, keep, variant=variant)
            alt = _err(r.out, out)
            if alt > tol or self._weights_err(r, w) > 1e-5:
                continue
            if variant != "width-scale":
                self.skip("wrong-output", "explained")
            data = {"err": err, "alt": alt, "d": d, "inv": d**-0.5}
            if variant == "no-scaling":
                return self.fail("no-scaling", data)
            if variant == "scale-after-softmax":
                return self.fail("scale-after-softmax", {**data, **self._sums(r, -1, "row_sums")})
            if variant.startswith("softmax-axis"):
                return self.fail("softmax-axis", {**data, **self._sums(r, -1, "col_sums")})
            if variant == "shared-projection":
                k = h.named.get("k") or h.named.get("qkv")
                return self.fail("shared-projection", {"name": k.name, "role": "k"})
            self.wrong_hints.append("width_scale")
            self.wrong_data.update(e=h.width, d=d)
            break
        explained = {"shared-projection", "heads-split-on-sequence", "dropout-in-eval"}
        if explained & self.findings.keys() and not self.wrong_hints:
            return self.skip("wrong-output", "explained")
        hints = self.wrong_hints + (["weights"] if werr > 1e-5 and err <= tol else [])
        self.fail(
            "wrong-output",
            {"err": err, "tol": tol, "werr": werr, "hints": hints, **self.wrong_data},
        )

    def _weights_only(self, r, d: int, err: float) -> bool:
        """The output is right but the returned weights are not: rows summing to 1/sqrt(d)
        or columns summing to 1 still name the pitfall."""
        rows, cols = r.weights.sum(-1), r.weights.sum(-2)
        data = {"err": err, "alt": 0.0, "d": d, "inv": d**-0.5}
        if torch.allclose(rows, torch.full_like(rows, d**-0.5), atol=1e-6):
            self.fail("scale-after-softmax", {**data, **self._sums(r, -1, "row_sums")})
        elif torch.allclose(cols, torch.ones_like(cols), atol=1e-6):
            self.fail("softmax-axis", {**data, **self._sums(r, -1, "col_sums")})
        else:
            return False
        self.skip("wrong-output", "explained")
        return True

    @staticmethod
    def _sums(r, axis: int, kind: str) -> dict:
        if r.weights is None:
            return {"evidence": "formula"}
        s = r.weights.sum(axis)
        return {"evidence": kind, "lo": float(s.min()), "hi": float(s.max())}


def run(target: Target, source_obj) -> CheckReport:
    """Run every probe on a built target; raises CheckError when it cannot be called."""
    return _Run(target, source_obj).run()

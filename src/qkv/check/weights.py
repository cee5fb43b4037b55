"""A module's own weights, read by name, and the reference computed with them.

Letters: N batch, H heads, L length, D head dim, E model width.
A projection is an `nn.Linear` (y = x Wᵀ + b), a fused one (q, k, v stacked on the output
axis: in_proj, to_qkv, c_attn), or a raw 2-D tensor/array (y = x W + b, or x Wᵀ + b: both
orientations are tried). Roles come from the names learners use (W_q, q_proj, query,
linears.0, to_qkv, out_proj, fc, ...); unnamed layers are taken in definition order.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import attention

__all__ = ["Proj", "attend", "collect", "module_reference", "perturbed", "roles", "scores"]

_Q = {"q", "query", "queries", "wq", "qw", "qproj", "toq"}
_K = {"k", "key", "keys", "wk", "kw", "kproj", "tok"}
_V = {"v", "value", "values", "wv", "vw", "vproj", "tov"}
_O = {"o", "out", "output", "wo", "proj", "fc", "dense", "outproj", "concat", "final", "combine"}


@dataclass
class Proj:
    """One projection: its attribute path, its role (q/k/v/o/qkv/kv) and live storage."""

    name: str
    weight: object  # torch.Tensor or np.ndarray, the learner's own storage
    bias: object | None
    linear: bool  # True: nn.Linear layout (out, in)
    role: str | None = None

    def apply(self, x: torch.Tensor, orient: int = 0) -> torch.Tensor:
        w = _t(self.weight)
        b = None if self.bias is None else _t(self.bias)
        if self.linear:
            return F.linear(x, w, b)
        y = x @ (w if orient == 0 else w.T)
        return y if b is None else y + b

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0] if self.linear else self.weight.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1] if self.linear else self.weight.shape[0])


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def role_of(name: str) -> str | None:
    """q, k, v, o, qkv or kv from an attribute path ("to_out.0" is named by "to_out")."""
    parts = [c for c in name.split(".") if not c.isdigit()] or [name]
    last = parts[-1].lower()
    if "qkv" in last or last in ("in_proj", "in_proj_weight", "c_attn"):
        return "qkv"
    if re.search(r"(^|_)(to_)?kv($|_)|^wkv$", last):
        return "kv"
    tokens = [t for t in re.split(r"[^a-z]+", last) if t]
    joined = "".join(tokens)
    for role, words in (("q", _Q), ("k", _K), ("v", _V)):
        if any(t in words for t in tokens) or joined in words:
            return role
    if any(t in _O for t in tokens) or joined in _O or last == "c_proj":
        return "o"
    return None


def collect(obj) -> list[Proj]:
    """The projections of `obj` (an nn.Module or a plain object), in definition order."""
    found: list[Proj] = []
    if isinstance(obj, nn.Module):
        _from_module(obj, "", found)
    elif not inspect.isroutine(obj) and hasattr(obj, "__dict__"):
        _from_attrs(vars(obj), "", found)
    return found


def _from_module(module: nn.Module, prefix: str, found: list[Proj]) -> None:
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(sub, nn.Linear):
            found.append(Proj(name, sub.weight, sub.bias, True))
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            found.append(Proj(f"{name}.in_proj", sub.in_proj_weight, sub.in_proj_bias, True))
        if isinstance(sub, (nn.Linear, nn.MultiheadAttention)):
            continue
        params = dict(sub.named_parameters(recurse=False))
        _from_attrs(params, f"{name}." if name else "", found)
        if not prefix:  # raw tensors kept as plain attributes of a module
            extra = {
                k: v
                for k, v in vars(sub).items()
                if isinstance(v, (torch.Tensor, np.ndarray)) and not k.startswith("_")
            }
            _from_attrs(extra, f"{name}." if name else "", found)


def _from_attrs(attrs: dict, prefix: str, found: list[Proj]) -> None:
    biases = {}
    for key, value in attrs.items():
        name = f"{prefix}{key}"
        if isinstance(value, nn.Module):
            _from_module(value, name + ".", found)
        elif isinstance(value, (list, tuple)):
            _from_attrs({str(i): item for i, item in enumerate(value)}, name + ".", found)
        elif isinstance(value, (torch.Tensor, np.ndarray)) and _is_float(value):
            if value.ndim == 2:
                found.append(Proj(name, value, None, False))
            elif value.ndim == 1:
                biases[name] = value
    for name, b in biases.items():
        role = role_of(name)
        for p in found:
            same = p.role is None and role and role_of(p.name) == role and p.bias is None
            if same and not p.linear and p.out_dim == b.shape[0]:
                p.bias = b
                break


def _is_float(x) -> bool:
    return x.is_floating_point() if isinstance(x, torch.Tensor) else x.dtype.kind == "f"


def roles(projs: list[Proj]) -> dict[str, Proj] | None:
    """{q, k, v[, o]} or {qkv[, o]} or {q, kv[, o]}; None when they cannot be told apart."""
    named: dict[str, Proj] = {}
    indexed = _by_index(projs)
    for p in projs:
        role = indexed.get(p.name) or role_of(p.name)
        if role and role not in named:
            named[role] = p
    if {"q", "k", "v"} <= named.keys() or "qkv" in named or {"q", "kv"} <= named.keys():
        pass
    elif not any(r in named for r in ("q", "k", "v", "qkv", "kv")):
        named = _by_order(projs)
    else:
        return None
    if not named:
        return None
    for p in projs:
        p.role = next((r for r, q in named.items() if q is p), None)
    return named


def _by_index(projs: list[Proj]) -> dict[str, str]:
    """linears.0..3 (a ModuleList of 3 or 4 layers): q, k, v, o by position."""
    groups: dict[str, list[Proj]] = {}
    for p in projs:
        parent, _, last = p.name.rpartition(".")
        if last.isdigit():
            groups.setdefault(parent, []).append(p)
    out = {}
    for group in groups.values():
        if len(group) in (3, 4):
            for p, role in zip(group, "qkvo", strict=False):
                out[p.name] = role
    return out


def _by_order(projs: list[Proj]) -> dict[str, Proj]:
    if len(projs) in (3, 4):
        return dict(zip(("q", "k", "v", "o"), projs, strict=False))
    if len(projs) in (1, 2) and projs[0].out_dim == 3 * projs[0].in_dim:
        return dict(zip(("qkv", "o"), projs, strict=False))
    return {}


def attend(q, k, v, keep=None, causal=False, variant="ref", width=None):
    """(N, H, Lq, D) inputs -> (out (N, H, Lq, Dv), weights (N, H, Lq, Lk)) for `variant`:
    "ref" (qkv.attention), "no-scaling", "scale-after-softmax", "softmax-axis",
    "softmax-axis-unscaled", "width-scale" (1/sqrt(width)), "masked-row-uniform" (-1e9 fill).
    """
    d = q.shape[-1]
    if variant in ("ref", "no-scaling", "scale-after-softmax", "width-scale"):
        scale = {"no-scaling": 1.0, "scale-after-softmax": 1.0}.get(variant)
        if variant == "width-scale":
            scale = width**-0.5
        r = attention(q, k, v, mask=keep, causal=causal, scale=scale, return_weights=True)
        out, w = r.output, r.weights
        if variant == "scale-after-softmax":
            out, w = out / d**0.5, w / d**0.5
        return out, w
    s = q @ k.transpose(-2, -1) * (1.0 if variant == "softmax-axis-unscaled" else d**-0.5)
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool) if keep is None else keep
    if causal:
        allowed = allowed & torch.ones_like(allowed).tril(s.shape[-1] - s.shape[-2])
    if variant == "masked-row-uniform":
        w = torch.softmax(s.masked_fill(~allowed, -1e9), dim=-1)
    else:  # softmax over the queries
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-2).nan_to_num(0.0)
    return w @ v, w


def module_reference(named, heads, xq, xk, xv, keep=None, causal=False, variant="ref", orient=0):
    """The module's attention from its own weights: project, split heads on the feature
    axis, attend, merge, output projection. x* (N, L, E) -> (out (N, Lq, Eo), weights
    (N, H, Lq, Lk))."""
    if "qkv" in named:
        p = named["qkv"]
        q = p.apply(xq, orient).chunk(3, -1)[0]
        k = p.apply(xk, orient).chunk(3, -1)[1]
        v = p.apply(xv, orient).chunk(3, -1)[2]
        if variant == "shared-projection":
            k, v = p.apply(xk, orient).chunk(3, -1)[0], p.apply(xv, orient).chunk(3, -1)[0]
    else:
        q = named["q"].apply(xq, orient)
        if "kv" in named:
            k, v = (
                named["kv"].apply(xk, orient).chunk(2, -1)[0],
                named["kv"].apply(xv, orient).chunk(2, -1)[1],
            )
        else:
            k, v = named["k"].apply(xk, orient), named["v"].apply(xv, orient)
        if variant == "shared-projection":
            k, v = named["q"].apply(xk, orient), named["q"].apply(xv, orient)
    N, Lq, Eq = q.shape
    Lk, Ev = k.shape[1], v.shape[-1]
    q = q.view(N, Lq, heads, Eq // heads).transpose(1, 2)  # (N, H, Lq, D)
    k = k.view(N, Lk, heads, Eq // heads).transpose(1, 2)  # (N, H, Lk, D)
    v = v.view(N, Lk, heads, Ev // heads).transpose(1, 2)  # (N, H, Lk, Dv)
    inner = "ref" if variant == "shared-projection" else variant
    out, w = attend(q, k, v, keep, causal, inner, width=Eq)
    out = out.transpose(1, 2).reshape(N, Lq, Ev)  # (N, Lq, H * Dv)
    if "o" in named:
        out = named["o"].apply(out, orient)
    return out, w


def scores(named, heads, x, orient=0) -> torch.Tensor:
    """The scaled scores (N, H, L, L) of self-attention on x (N, L, E) with these weights."""
    if "qkv" in named:
        q, k, _ = named["qkv"].apply(x, orient).chunk(3, -1)
    else:
        q = named["q"].apply(x, orient)
        k = (
            named["kv"].apply(x, orient).chunk(2, -1)[0]
            if "kv" in named
            else named["k"].apply(x, orient)
        )
    N, L, E = q.shape
    q = q.view(N, L, heads, E // heads).transpose(1, 2)
    k = k.view(N, L, heads, E // heads).transpose(1, 2)
    return q @ k.transpose(-2, -1) * (E // heads) ** -0.5


class perturbed:
    """Noise on block `i` of `n` of a projection's weight, restored on exit."""

    def __init__(self, p, i: int, n: int, orient: int):
        self.w = p.weight
        axis = 0 if p.linear or orient == 1 else 1
        size = self.w.shape[axis] // n
        index = [slice(None), slice(None)]
        index[axis] = slice(i * size, (i + 1) * size)
        self.index = tuple(index)

    def __enter__(self):
        if isinstance(self.w, torch.Tensor):
            self.saved = self.w.detach().clone()
            with torch.no_grad():
                self.w[self.index] += _noise(self.w[self.index].shape).to(self.w.dtype)
        else:
            self.saved = self.w.copy()
            self.w[self.index] += _noise(self.w[self.index].shape).numpy()
        return self

    def __exit__(self, *exc):
        if isinstance(self.w, torch.Tensor):
            with torch.no_grad():
                self.w.copy_(self.saved)
        else:
            self.w[...] = self.saved


def _noise(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(17)
    return torch.randn(*shape, generator=g, dtype=torch.float64)

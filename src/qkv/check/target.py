"""Build the learner's target and call it the ways learners write attention.

Letters: N batch, H heads, Lq/Lk lengths, D head dim, E model width. Inside the checker
every tensor is torch float64: a function's inputs are (N, H, L, D) and are squeezed to the
layout the learner's code takes ((N, L, D), (N, H, L, D) or (L, D)); a module's input is
(N, L, E) (or (L, E) unbatched). Results come back as torch float64 in the same layout.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .loader import (
    CAUSAL_NAMES,
    MASK_NAMES,
    CheckError,
    call_signature,
    dim_names,
    input_names,
    learner_line,
)

__all__ = ["HEADS", "WIDTH", "Result", "Target", "build"]

WIDTH = 8  # E given to a class for its model width
HEADS = 2  # H given to a class for its number of heads
_WIDTH = re.compile(
    r"^(d_model|embed_dim|input_dim|hidden_dim|hidden_size|dim|model_dim|emb_dim|embedding_dim|"
    r"d_in|in_dim|n_embd|n_embed|output_dim|out_dim|d_out|in_features|d_hidden|size|d|e)$",
    re.I,
)
_HEAD_DIM = re.compile(
    r"^(d_k|d_v|d_q|dk|dv|head_dim|d_head|dim_head|head_size|dim_k|dim_v|dim_q|k_dim|v_dim|"
    r"key_dim|value_dim|qk_dim)$",
    re.I,
)
_HEADS = re.compile(
    r"^(heads|num_heads|n_heads|h|n_head|nhead|head_num|num_head|nheads|num_attention_heads)$",
    re.I,
)
HEAD_ATTRS = (
    "num_heads", "n_heads", "heads", "h", "n_head", "nhead", "nheads", "head_num", "num_head",
    "num_attention_heads",
)  # fmt: skip


@dataclass
class Result:
    """What one call returned: the output and the weights (None when not returned)."""

    out: torch.Tensor | None
    weights: torch.Tensor | None
    raw_shapes: list[tuple[int, ...]] = field(default_factory=list)


def build(obj, init: dict) -> tuple[object, dict]:
    """The callable to check: a function as it is, a class constructed from `init` plus
    filled common parameter names, an instance as it is. Modules go to eval() mode."""
    if not inspect.isclass(obj):
        if init:
            raise CheckError(f"init values {sorted(init)} given, but the target is not a class")
        _eval(obj)
        return obj, {}
    try:
        sig = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
        sig = inspect.Signature()
    params = [p for p in list(sig.parameters.values())[1:]]
    names = {p.name for p in params}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    unknown = sorted(set(init) - names) if not takes_any else []
    if unknown:
        raise CheckError(
            f"cannot build {obj.__name__}: it takes no parameter {unknown[0]!r} "
            f"(it takes {', '.join(sorted(names)) or 'none'})"
        )
    has_heads = any(_HEADS.match(n) for n in names)
    kwargs = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in init:
            kwargs[p.name] = init[p.name]
        elif _HEADS.match(p.name):
            kwargs[p.name] = HEADS
        elif _HEAD_DIM.match(p.name):
            kwargs[p.name] = WIDTH // HEADS if has_heads else WIDTH
        elif _WIDTH.match(p.name) or (p.default is p.empty and re.search("dim|size", p.name)):
            kwargs[p.name] = WIDTH
        elif "drop" in p.name.lower():
            kwargs[p.name] = 0.0
        elif p.default is p.empty:
            raise CheckError(
                f"cannot build {obj.__name__}: parameter {p.name!r} has no default; "
                f"give it with --init {p.name}=VALUE"
            )
    for k, v in init.items():
        kwargs.setdefault(k, v)
    torch.manual_seed(0)
    np.random.seed(0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            instance = obj(**kwargs)
    except Exception as e:
        line = learner_line(e, inspect.getsourcefile(obj) or "")
        where = f" (line {line})" if line else ""
        raise CheckError(
            f"cannot build {obj.__name__}({_args(kwargs)}): {type(e).__name__}: {e}{where}"
        ) from None
    _eval(instance)
    return instance, kwargs


def _args(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _eval(obj) -> None:
    if isinstance(obj, nn.Module):
        obj.eval()
    elif not inspect.isroutine(obj):
        for value in vars(obj).values():
            if isinstance(value, nn.Module):
                value.eval()


def _is_lazy(obj) -> bool:
    params = []
    if isinstance(obj, nn.Module):
        params = list(obj.parameters())
    elif not inspect.isroutine(obj):
        for value in vars(obj).values():
            if isinstance(value, nn.Module):
                params += list(value.parameters())
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in params)


def to_float64(obj) -> None:
    """Move the learner's weights to float64 in place (modules, tensors, arrays)."""
    if isinstance(obj, nn.Module):
        obj.double()
        return
    if inspect.isroutine(obj) or not hasattr(obj, "__dict__"):
        return
    for name, value in list(vars(obj).items()):
        if isinstance(value, nn.Module):
            value.double()
        elif isinstance(value, nn.Parameter) and value.is_floating_point():
            setattr(obj, name, nn.Parameter(value.detach().double()))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(obj, name, value.double())
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            setattr(obj, name, value.astype(np.float64))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, nn.Module):
                    item.double()
                elif isinstance(item, np.ndarray) and item.dtype.kind == "f":
                    value[i] = item.astype(np.float64)


class Target:
    """A built target and how to call it: inputs (q, k, v) or (x), the mask and causal
    parameters, the framework (torch or NumPy) and the input layout."""

    def __init__(self, name: str, obj, source_obj, path: str | None, init: dict):
        self.name = name
        self.obj = obj
        self.path = path
        self.init = init
        sig = call_signature(obj if not inspect.isclass(source_obj) else source_obj)
        if sig is None:
            raise CheckError(f"{name} cannot be called")
        self.sig = sig
        self.inputs = input_names(sig)
        if len(self.inputs) not in (1, 3):
            raise CheckError(f"{name} takes inputs {self.inputs}: expected (q, k, v) or (x)")
        self.takes_x = len(self.inputs) == 1
        self.mask_param = next((p for p in sig.parameters if MASK_NAMES.match(p)), None)
        self.causal_param = next((p for p in sig.parameters if CAUSAL_NAMES.match(p)), None)
        self.is_module = _has_weights(obj)
        try:
            source = inspect.getsource(source_obj if inspect.isclass(source_obj) else obj)
        except (OSError, TypeError):
            source = ""
        numpy_first = "np." in source and not re.search(r"\btorch\b|\bF\.|\bnn\.", source)
        self.frameworks = ["numpy", "torch"] if numpy_first else ["torch", "numpy"]
        if isinstance(obj, nn.Module):
            self.frameworks = ["torch"]
        self.framework = self.frameworks[0]
        self.layout = ""
        self.mask_shape = "full"
        self.convention = "keep"
        self.no_mask: str = "none"  # how to call without a mask: "none" (None) or "all"
        self.lazy = _is_lazy(obj)
        self.quiet_kwargs = _no_dropout(sig)
        self.dim_params = dim_names(sig)
        self.heads = _heads(obj, init)

    # ---- conversion -------------------------------------------------------------------

    def _to(self, t: torch.Tensor):
        if self.framework == "numpy":
            return t.detach().numpy().copy()
        return t.detach().clone()

    def _back(self, x) -> torch.Tensor | None:
        if isinstance(x, torch.Tensor):
            return x.detach().to(torch.float64)
        if isinstance(x, np.ndarray) and x.dtype.kind in "fiub":
            return torch.from_numpy(np.asarray(x, dtype=np.float64).copy())
        return None

    def squeeze(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical (N, H, L, D) / (N, L, E) -> the learner's layout."""
        if self.layout == "NLD":
            return t[:, 0]
        if self.layout == "LD":
            return t[0, 0]
        if self.layout == "LE":
            return t[0]
        return t

    def canonical_shape(self, n: int, h: int) -> tuple[int, int]:
        """(N, H) of the canonical tensors for this layout."""
        return {"NLD": (n, 1), "NHLD": (n, h), "LD": (1, 1), "NLE": (n, 1), "LE": (1, 1)}[
            self.layout
        ]

    def _mask_arg(self, keep: torch.Tensor, lead: tuple[int, ...]):
        """keep (Lq, Lk) True = may attend -> the learner's mask in its convention and shape."""
        m = keep if self.convention == "keep" else ~keep
        if self.convention == "additive":  # added to the scores: 0 = may attend, -inf = hidden
            m = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        if self.mask_shape == "full":
            m = m.expand(*lead, *m.shape)
        elif self.mask_shape == "heads1":
            m = m.expand(lead[0], 1, *m.shape)
        elif self.mask_shape == "keys":  # a key padding mask (N, Lk): its rows are all equal
            m = m[0].expand(*lead[:1], m.shape[-1])
        return self._to(m.contiguous())

    # ---- calling ----------------------------------------------------------------------

    def call(
        self,
        inputs: list[torch.Tensor],
        keep: torch.Tensor | None = None,
        causal: bool | None = None,
        seed: int | None = 0,
    ) -> Result:
        """Call the target on canonical float64 `inputs` ([q, k, v] or [x]).

        keep: (Lq, Lk) bool, True = may attend, given in the learner's convention, or None.
        seed: torch/NumPy seed set before the call (None: leave the random state alone).
        """
        args = [self._to(self.squeeze(t)) for t in inputs]
        if self.takes_x:
            args = args[:1]
        lead = tuple(self.squeeze(inputs[0]).shape[:-2])
        kwargs = {}
        if self.mask_param is not None:
            if keep is not None:
                kwargs[self.mask_param] = self._mask_arg(keep, lead)
            elif self.no_mask == "all":
                lq, lk = inputs[0].shape[-2], inputs[-1 if self.takes_x else 1].shape[-2]
                kwargs[self.mask_param] = self._mask_arg(torch.ones(lq, lk, dtype=torch.bool), lead)
        if self.causal_param is not None:  # not causal unless asked: a default of True is off
            kwargs[self.causal_param] = bool(causal)
        kwargs.update(self.quiet_kwargs)
        kwargs.update({name: int(inputs[0].shape[-1]) for name in self.dim_params})
        if seed is not None:
            torch.manual_seed(seed)
            np.random.seed(seed)
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), _quiet():
            got = self.obj(*args, **kwargs)
        return self._parse(got, inputs)

    def _parse(self, got, inputs) -> Result:
        items = list(got) if isinstance(got, (tuple, list)) else [got]
        tensors = [t for t in (self._back(x) for x in items) if t is not None]
        shapes = [tuple(t.shape) for t in tensors]
        if not tensors:
            return Result(None, None, shapes)
        want_out = self.expected_out(inputs)
        out = next((t for t in tensors if tuple(t.shape) == want_out), None)
        rest = [t for t in tensors if t is not out]
        if out is None:
            out, rest = tensors[0], tensors[1:]
        weights = rest[0] if rest else None
        return Result(out, weights, shapes)

    def expected_out(self, inputs) -> tuple[int, ...] | None:
        """The output shape in the learner's layout (modules: None for the last dim)."""
        q = self.squeeze(inputs[0])
        if self.is_module:
            return (*tuple(q.shape[:-1]), self.out_width)
        v = self.squeeze(inputs[2])
        return (*tuple(q.shape[:-1]), v.shape[-1])

    out_width: int | None = None

    def describe(self) -> str:
        extra = [p for p in (self.mask_param, self.causal_param) if p]
        names = ", ".join(self.inputs + extra)
        layout = {
            "NLD": "(N, L, D)",
            "NHLD": "(N, H, L, D)",
            "LD": "(L, D) unbatched",
            "NLE": "(N, L, E)",
            "LE": "(L, E) unbatched",
        }[self.layout]
        kind = "NumPy arrays" if self.framework == "numpy" else "torch tensors"
        init = f" built with {_args(self.init)}" if self.init else ""
        return f"{self.name}({names}): {kind} {layout}{init}"

    def source_lines(self) -> list[str]:
        if not self.path:
            return []
        try:
            return Path(self.path).read_text().splitlines()
        except OSError:
            return []


def _no_dropout(sig: inspect.Signature) -> dict:
    """A function's own dropout probability and training flag, turned off for the check."""
    kwargs = {}
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if "drop" in p.name.lower() and isinstance(p.default, float):
            kwargs[p.name] = 0.0
        elif p.name in ("training", "train", "is_training") and isinstance(p.default, bool):
            kwargs[p.name] = False
    return kwargs


@contextlib.contextmanager
def _quiet():
    """No overflow warnings: the probes overflow on purpose."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _has_weights(obj) -> bool:
    if isinstance(obj, nn.Module):
        return any(True for _ in obj.parameters())
    if inspect.isroutine(obj) or not hasattr(obj, "__dict__"):
        return False
    for value in vars(obj).values():
        if isinstance(value, nn.Module) and any(True for _ in value.parameters()):
            return True
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 2:
            return True
        if isinstance(value, list) and any(isinstance(x, nn.Module) for x in value):
            return True
    return False


def _heads(obj, init: dict) -> int:
    if inspect.isroutine(obj):
        return 1
    for attr in HEAD_ATTRS:
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for k, v in init.items():
        if _HEADS.match(k) and isinstance(v, int):
            return v
    return 1

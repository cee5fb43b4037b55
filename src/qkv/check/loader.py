"""Find the learner's attention in a file: import it by path and pick the target.

A target is a function whose parameters look like (q, k, v[, mask]) or (x), or a class
(nn.Module or plain) whose `forward`/`__call__` does. Helpers (names starting with `_`,
softmax, split/merge of heads, ...) are never targets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import traceback
import types
from pathlib import Path

__all__ = ["CheckError", "candidates", "learner_line", "load_file", "resolve"]

_HELPER = re.compile(r"softmax|split|merge|combine|reshape|transpose|mask|init|test|main|demo")
_ATTN = re.compile(r"attn|attention|atten|sdpa", re.I)
_QKV_FIRST = re.compile(r"^(q|query|queries|k|key|keys|v|value|values|x|inputs?|h|hidden)", re.I)
MASK_NAMES = re.compile(r"^(mask|attn_mask|attention_mask|masks|m|causal_mask)$", re.I)
CAUSAL_NAMES = re.compile(r"^(causal|is_causal|use_causal_mask|autoregressive)$", re.I)
DIM_NAMES = re.compile(r"^(d_k|dk|d|dim|head_dim|d_head|dim_k|key_dim)$", re.I)  # f(q, k, v, d_k)


class CheckError(Exception):
    """The target cannot be loaded, built or called (exit code 2 of `qkv check`)."""


def load_file(path: str | Path) -> types.ModuleType:
    """Import the Python file at `path` as a fresh module (its own imports allowed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckError(f"{path}: no such file")
    name = "qkv_check_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CheckError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CheckError(f"cannot load {path}: SyntaxError: {e.msg} (line {e.lineno})") from None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        line = learner_line(e, path)
        where = f" (line {line})" if line else ""
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        hint = f"; pip install {missing}" if missing and "." not in missing else ""
        raise CheckError(f"cannot load {path}: {type(e).__name__}: {e}{where}{hint}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def learner_line(error: BaseException, path: str | Path) -> int | None:
    """The last line of the learner's file in the traceback of `error`, if any."""
    target = str(Path(path).resolve())
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if str(Path(frame.filename).resolve()) == target:
            line = frame.lineno
    return line


def call_signature(obj) -> inspect.Signature | None:
    """The signature the target is called with: forward/__call__ for classes and instances."""
    fn = obj
    if inspect.isclass(obj) or not inspect.isroutine(obj):
        cls = obj if inspect.isclass(obj) else type(obj)
        fn = _method(cls)
        if fn is None:
            return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if (inspect.isclass(obj) or not inspect.isroutine(obj)) and params:
        params = params[1:]  # self
    return sig.replace(parameters=params)


def _method(cls):
    for name in ("forward", "__call__"):
        for klass in cls.__mro__:
            if klass.__module__ in ("torch.nn.modules.module", "builtins"):
                break  # nn.Module's own forward/__call__ say nothing
            if name in vars(klass):
                return vars(klass)[name]
    return None


def input_names(sig: inspect.Signature) -> list[str]:
    """The required positional inputs (not the mask or a causal flag)."""
    names = []
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        if MASK_NAMES.match(p.name) or CAUSAL_NAMES.match(p.name):
            continue
        if p.default is p.empty and not (names and DIM_NAMES.match(p.name)):
            names.append(p.name)
    return names


def dim_names(sig: inspect.Signature) -> list[str]:
    """Required parameters after the inputs that give the head dim: f(q, k, v, d_k)."""
    inputs = input_names(sig)
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.name not in inputs and DIM_NAMES.match(p.name)
    ]


def looks_like_attention(name: str, obj) -> bool:
    """True for a function or class whose call looks like (q, k, v[, mask]) or (x)."""
    if name.startswith("_") or (_HELPER.search(name.lower()) and not _ATTN.search(name)):
        return False
    sig = call_signature(obj)
    if sig is None:
        return False
    inputs = input_names(sig)
    if len(inputs) == 3:
        return bool(_ATTN.search(name) or all(_QKV_FIRST.match(n) for n in inputs))
    if len(inputs) == 1:  # (x): a self-attention module, or a function named for attention
        return bool(_ATTN.search(name)) or (inspect.isclass(obj) and _QKV_FIRST.match(inputs[0]))
    return False


def candidates(module: types.ModuleType) -> list[str]:
    """Names of the attention-like functions and classes defined in `module`."""
    found = []
    for name, obj in vars(module).items():
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported, not defined here
        if looks_like_attention(name, obj):
            found.append(name)
    return found


def split_spec(spec: str) -> tuple[str, str]:
    """`FILE[:NAME]` -> (FILE, NAME or ""); a file whose own name holds ':' stays whole."""
    if not Path(spec).is_file() and ":" in spec:
        path, _, name = spec.rpartition(":")
        return path, name
    return spec, ""


def file_problem(spec: str) -> str | None:
    """Why FILE of `FILE[:NAME]` cannot be a learner's file, before anything is started."""
    path, _ = split_spec(spec)
    if not path.strip():
        return "FILE is empty: give the path of a Python file (FILE or FILE:NAME)"
    if Path(path).is_dir():
        return f"{path}: is a directory; give the Python file inside it (FILE or FILE:NAME)"
    if not Path(path).is_file():
        return f"{path}: no such file"
    return None


def resolve(spec: str) -> tuple[Path, types.ModuleType, str, object]:
    """`FILE[:NAME]` -> (path, module, name, object); raises CheckError saying why not."""
    why = file_problem(spec)
    if why is not None:
        raise CheckError(why)
    path, name = split_spec(spec)
    module = load_file(path)
    if name:
        if not hasattr(module, name):
            raise CheckError(f"{path} defines no {name!r} (candidates: {_listing(module)})")
        return Path(path), module, name, getattr(module, name)
    found = candidates(module)
    if not found:
        raise CheckError(
            f"{path}: no attention-like function or class (parameters (q, k, v[, mask]) or (x))"
        )
    if len(found) > 1:
        raise CheckError(
            f"{path}: several candidates: {', '.join(found)}; pick one with {path}:NAME"
        )
    return Path(path), module, found[0], getattr(module, found[0])


def _listing(module: types.ModuleType) -> str:
    return ", ".join(candidates(module)) or "none"

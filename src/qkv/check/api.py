"""`qkv.check`: in-process for a live object, in a worker process for `FILE[:NAME]`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from .loader import CheckError, resolve
from .report import CheckReport

__all__ = ["DEFAULT_TIMEOUT", "check", "check_spec", "run_file"]

DEFAULT_TIMEOUT = 60.0  # seconds a target may take in the worker process


def check(obj, **init) -> CheckReport:
    """Grade a hand-written attention against qkv and name the mistake.

    Args:
        obj: a function f(q, k, v[, mask]) or f(x), a class (nn.Module or plain) whose
            forward/__call__ takes those, an instance of one, or a path "FILE[:NAME]"
            (then the file is imported and run in a worker process with a time limit).
        **init: constructor arguments for a class (the rest are filled: widths 8, heads 2,
            dropout 0.0, defaults kept).

    Returns:
        A CheckReport: `ok`, `findings` (ids such as "no-scaling"), `checks`, `.text()`,
        `.to_json()`.

    Raises:
        TypeError: obj is none of the above.
        CheckError: the target cannot be loaded, built or called (`qkv check` exits 2).
    """
    if isinstance(obj, (str, Path)):
        return run_file(str(obj), init)
    if not callable(obj):
        raise TypeError(
            "obj must be a function, a class, an instance with forward/__call__, or a "
            f"'FILE[:NAME]' path; got {type(obj).__name__}"
        )
    if init and not inspect.isclass(obj):
        raise TypeError(f"init values {sorted(init)} given, but obj is not a class")
    name = getattr(obj, "__name__", type(obj).__name__)
    path = _source_file(obj)
    return _check_object(name, obj, path, init)


def _source_file(obj) -> str | None:
    try:
        return inspect.getsourcefile(
            obj if inspect.isroutine(obj) or inspect.isclass(obj) else type(obj)
        )
    except TypeError:
        return None


def _check_object(name: str, obj, path: str | None, init: dict) -> CheckReport:
    import numpy as np
    import torch

    from .probes import run
    from .target import Target, build

    states = torch.get_rng_state(), np.random.get_state()  # the probes seed both
    try:
        built, used = build(obj, init)
        source = obj if inspect.isclass(obj) or inspect.isroutine(obj) else type(obj)
        target = Target(name, built, source, path, used)
        return run(target, source)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])


def check_spec(spec: str, init: dict) -> CheckReport:
    """`FILE[:NAME]` checked in this process (what the worker runs)."""
    path, _, name, obj = resolve(spec)
    return _check_object(name, obj, str(path), init)


def run_file(spec: str, init: dict, *, timeout: float = DEFAULT_TIMEOUT) -> CheckReport:
    """`FILE[:NAME]` checked in a worker process stopped after `timeout` seconds."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the qkv package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    request = json.dumps({"spec": spec, "init": repr(init)})  # literals kept as they are
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qkv.check._worker"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise CheckError(
            f"{spec}: no result within {timeout:g} s (an endless loop?); the worker was stopped"
        ) from None
    answer = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            answer = json.loads(line)
            break
    if answer is None:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CheckError(f"{spec}: the worker process died (exit code {done.returncode}): {last}")
    if "error" in answer:
        raise CheckError(answer["error"])
    return CheckReport.from_wire(answer["report"])

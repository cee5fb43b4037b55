"""Peak memory of one benchmark call, each contender in a fresh interpreter (`qkv bench`'s
"peak" column): what one call adds to the resident size above its inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

__all__ = ["memory_child", "peak_memory"]


def _status_kib(field: str) -> int | None:
    """A size from /proc/self/status (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(case_name: str, contender: str, quick: bool) -> float:
    """MiB of resident memory one call of `contender` adds above its inputs (in this
    process, which should be fresh: see `peak_memory`)."""
    import resource

    from qkv.bench import _callables, _flex, _inputs, suite

    c = next(case for case in suite(quick) if case.name == case_name)
    q, k, v = _inputs(c, c.backward)
    if contender == "flex":
        call, _ = _flex(c)  # compiles (and runs once): not counted
    else:
        call = None
    # a fresh peak from here on: Linux resets VmHWM to the current size on "5"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak_of = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:  # no reset: the peak so far is the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    if call is None:
        call = _callables(c, only=contender)[contender]
    out = call(q, k, v)
    if c.backward:
        out.backward(torch.ones_like(out))
    return (peak_of() - base) / 1024


def peak_memory(case_name: str, contender: str, quick: bool, timeout: float = 600) -> float | None:
    """`memory_child` for the suite's case of that name, in a fresh interpreter; None if
    it fails.

    glibc keeps freed memory for reuse, which would hide allocations from the resident
    size; a fixed mmap threshold makes every large block come from (and go back to) the
    system, so the peak resident size sees them all.
    """
    cmd = [sys.executable, "-m", "qkv.bench", "--memory-of", case_name, contender]
    cmd += ["--quick"] if quick else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None

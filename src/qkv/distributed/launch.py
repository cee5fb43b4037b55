"""Run a function on a few local processes in one process group: for tests and benchmarks.

`run_local(fn, world_size, *args)` plays torchrun on one machine: it spawns world_size
fresh Python processes, gives each torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT), initialises a gloo process group over the loopback
interface, calls fn(*args) and returns what each rank returned, in rank order.

It always finishes: every wait has a deadline, the process group has a timeout, a worker
that raises makes the call raise RuntimeError with the worker's traceback, and every
process it started is killed and reaped before it returns or raises.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, backend, init, group_timeout, threads, args, results):
    try:
        torch.set_num_threads(threads)  # the ranks share the machine's cores
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if init:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=group_timeout),
            )
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs) -> None:
    """Kill and reap every process still running."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def run_local(
    fn,
    world_size: int,
    *args,
    backend: str = "gloo",
    init: bool = True,
    timeout: float = 60.0,
    group_timeout: float = 30.0,
    threads: int = 1,
) -> list:
    """fn(*args) on world_size spawned processes; their return values in rank order.

    Args:
        fn: a module-level function (it is pickled by name); inside it,
            torch.distributed.get_rank() tells the rank. Its return value must be
            picklable; plain numbers and lists travel best.
        world_size: how many processes.
        backend: the process group backend ("gloo" for CPU tensors).
        init: initialise the process group before calling fn (False: only set torchrun's
            environment variables, for code that initialises the group itself).
        timeout: seconds for the whole run; past it every worker is killed and
            TimeoutError raised.
        group_timeout: the process group's own timeout (a collective that waits for a
            dead peer fails after it).
        threads: torch threads per process.

    Raises:
        RuntimeError: a worker raised (its traceback is in the message) or died.
        TimeoutError: the run took longer than timeout.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable (a module-level function); got {type(fn).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        got = f"{type(world_size).__name__} {world_size!r}"
        raise TypeError(f"world_size must be an int; got {got}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, r, world_size, port, backend, init, group_timeout, threads, args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run_local: {world_size} workers did not finish within {timeout:g} s "
                    f"(finished: ranks {sorted(values)})"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 0.2))
            except queue.Empty:
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if r not in values and not p.is_alive() and p.exitcode is not None
                ]
                # a worker that died without reporting (killed, crashed in C code)
                if dead and results.empty():
                    time.sleep(0.2)  # its last message may still be in the pipe
                    if results.empty():
                        raise RuntimeError(
                            f"run_local: worker(s) exited without a result: (rank, exit "
                            f"code) {dead}"
                        ) from None
                continue
            if not ok:
                raise RuntimeError(f"run_local: rank {rank} of {world_size} failed:\n{value}")
            values[rank] = value
        for p in procs:
            p.join(max(deadline - time.monotonic(), 1.0))
    finally:
        _stop(procs)
        results.close()
        results.join_thread()
    return [values[r] for r in range(world_size)]

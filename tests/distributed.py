"""Runs a test's worker on several CPU processes joined by a gloo process group.

`run(world, worker, *args)` spawns `world` processes; each initialises torch.distributed (gloo, a free
local port) and calls worker(rank, world, *args), a module-level function named by its module and
qualified name. Exceptions come back with the failing rank's traceback; a rank that hangs fails the
test after `timeout` seconds instead of blocking it.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, module, name, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.pop("TRITON_INTERPRET", None)  # the losses run their references on CPU tensors here
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        fn = getattr(importlib.import_module(module), name)
        results.put((rank, None, fn(rank, world, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(world: int, worker, *args, timeout: float = 240.0) -> list:
    """Every rank's return value, in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, worker.__module__, worker.__qualname__, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, {}
    try:
        for _ in range(world):
            rank, error, value = results.get(timeout=timeout)
            if error:
                errors[rank] = error
            else:
                out[rank] = value
    except Exception as exc:  # a rank hung or died without reporting
        errors[-1] = f"not every rank reported within {timeout:.0f} s ({type(exc).__name__})"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
    return [out[r] for r in range(world)]

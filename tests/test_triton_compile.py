"""Offline GPU compiles of every Triton kernel launch the package makes (sm_90 by default; no GPU needed).

The Triton interpreter accepts code a real compile rejects (non-constexpr globals, tl.dot dtype
mismatches, bad constexpr use, ...), so the interpreter tests alone can pass while a GPU compile
fails. This test compiles each kernel with what its launcher really passes, without hand-written
signatures:

1. Record (a subprocess with TRITON_INTERPRET=1, at collection time): the public entry points run
   on small CPU tensors with backend="triton" while InterpretedFunction.run logs every launch
   (kernel, arguments, constexprs, num_warps, num_stages). Launchers choose GPU or interpreter
   settings from TRITON_INTERPRET at launch time (triton_kernels/__init__.py's `interpreting()`:
   contrastive for tiles_for, _dot_modes and the norm blocks, triplet for _mine_config and the pair
   block; the interpreter's tl.dot cannot take bf16, hence the fp32 upcasts there). So once every
   kernel module is imported (its @triton.jit functions are then InterpretedFunctions for good),
   the recorder sets TRITON_INTERPRET=0 and keeps only the backend registry's own check
   (`_backends.triton_interpreter`, which routes CPU tensors to the Triton ops) answering True:
   every launcher, whichever way it reads the variable, makes its GPU choice while the kernels
   still run in the interpreter. Numbers from bf16 dots are then meaningless; nothing here checks
   numbers, only that the host code gets through and what it launches.
   Each launch is turned into Triton's own launch specialization (the binder a JITFunction builds:
   pointer dtypes and 16-byte alignment, i32/i64/constexpr-1 integers, fp32 floats, u1 bools,
   constexpr None) for a CUDA target; identical specializations are compiled once.
2. Compile (a subprocess without the interpreter, so the modules hold real JITFunctions): each
   configuration goes through the same binder, `_pack_args` and triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32)) as a GPU launch would, in a pool of worker processes;
   registers and local memory come from cuobjdump (CompiledKernel.n_regs needs a driver).
3. Check: one test per configuration (a compile error fails it; known bugs are marked xfail
   strict in KNOWN_FAILURES), and every kernel that the package launches (found statically: a
   @triton.jit function called as kernel[grid](...)) must have been compiled at least once.

The recording is kept in pytest's cache, one entry per Triton version (runs with two Tritons keep
their own), under a hash of the package sources, Triton and torch versions (so a rerun only
recompiles, and Triton's own cache makes unchanged kernels cheap); LOSSFORGE_* variables are left
out of the subprocesses so tuning knobs do not change what is compiled.
LOSSFORGE_COMPILE_ARCHS="90,80" adds sm_80 (about twice the time). Skipped where Triton has no
CUDA backend or no ptxas, or lacks the launch internals this test drives. The registers / spills
table prints with -s (spills as Triton counts them: local memory bytes / 4).
"""
from __future__ import annotations

import ast
import concurrent.futures
import hashlib
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types

import pytest

THIS = pathlib.Path(__file__).resolve()
ARCHS = tuple(int(a) for a in os.environ.get("LOSSFORGE_COMPILE_ARCHS", "90").split(",") if a.strip())
RECORD_TIMEOUT_S = 300
COMPILE_TIMEOUT_S = 900

# (kernel name, {field: value} that the configuration must match, reason): marked xfail(strict=True).
# Fields: constexpr names, "dtypes" (the pointer dtypes, e.g. "bf16,fp32"), "num_warps", "num_stages".
KNOWN_FAILURES: list[tuple[str, dict, str]] = []


# ---- recording: runs in a subprocess under TRITON_INTERPRET=1 ---------------------------------------

def _cases():
    """(name, thunk) pairs: every entry-point option family, small shapes, bf16 and fp32. The shapes are
    chosen for the launch configurations they reach (single block vs chunked rows, feature widths of
    each tile regime), not for numerics."""
    import torch

    import lossforge_kernels as lf

    T = "triton"
    bf16, f32 = torch.bfloat16, torch.float32
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=f32, grad=True):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    def classes(n, c):
        return torch.randint(0, c, (n,), generator=gen)

    def backward(loss, factor=1.0):
        loss.backward(torch.full_like(loss, factor))  # a factor != 1 makes scale_grad do its pass

    def ce(dtype, c, reduction, soft=False, factor=1.0, **opts):
        def run():
            x = randn(3, c, dtype=dtype)
            t = torch.softmax(randn(3, c, grad=False), 1) if soft else classes(3, c)
            if not soft:
                t[1] = -100  # an ignored row
            backward(lf.cross_entropy(x, t, reduction=reduction, backend=T, **opts), factor)
        return run

    def lce(dtype, reduction, **opts):
        def run():
            x, w = randn(5, 32, dtype=dtype), randn(1000, 32, dtype=dtype)
            backward(lf.linear_cross_entropy(x, w, classes(5, 1000), reduction=reduction, chunk_size=2, backend=T,
                                             **opts), 2.0)
        return run

    def focal(dtype, reduction, **opts):
        def run():
            x = randn(4, 1000, dtype=dtype)
            t = (torch.rand(4, 1000, generator=gen) > 0.7).to(dtype)
            backward(lf.sigmoid_focal_loss(x, t, reduction=reduction, backend=T, **opts), 0.5)
        return run

    def info_nce(dtype, d, symmetric, normalize, grads=("q", "k", "s"), m=None):
        def run():
            q = randn(8, d, dtype=dtype, grad="q" in grads)
            k = randn(8 if m is None else m, d, dtype=dtype, grad="k" in grads)
            s = torch.tensor(10.0, requires_grad="s" in grads)
            backward(lf.info_nce(q, k, logit_scale=s, symmetric=symmetric, normalize=normalize, backend=T), 2.0)
        return run

    def supcon(dtype, d, normalize):
        def run():
            x = randn(8, d, dtype=dtype)
            backward(lf.supcon_loss(x, classes(8, 3), normalize=normalize, backend=T), 2.0)
        return run

    def siglip(dtype, d, normalize, grads=("q", "k", "s")):
        def run():
            q, k = randn(8, d, dtype=dtype, grad="q" in grads), randn(12, d, dtype=dtype, grad="k" in grads)
            s = torch.tensor(10.0, requires_grad="s" in grads)
            b = torch.tensor(-1.0, requires_grad="s" in grads)
            backward(lf.siglip_loss(q, k, s, b, normalize=normalize, reduction="sum", backend=T), 2.0)
        return run

    def triplet(dtype, d, mining="batch_hard", **opts):
        def run():
            x = randn(12, d, dtype=dtype)
            backward(lf.triplet_loss(x, classes(12, 3), mining=mining, backend=T, **opts), 2.0)
        return run

    def log_probs(dtype, c, linear=False, **opts):
        def run():
            t = classes(3, c)
            t[1] = -100
            if linear:
                logp, ent = lf.linear_log_probs(randn(3, 32, dtype=dtype), randn(c, 32, dtype=dtype), t, chunk_size=2,
                                                return_entropy=True, backend=T, **opts)
            else:
                logp, ent = lf.log_probs(randn(3, c, dtype=dtype), t, return_entropy=True, backend=T, **opts)
            (logp.sum() + 2.0 * ent.sum()).backward()
        return run

    def distillation(dtype, c, reduction, target=True, linear=False, **opts):
        def run():
            t = classes(3, c) if target else None
            if t is not None:
                t[1] = -100
            if linear:
                loss = lf.linear_distillation_loss(randn(3, 32, dtype=dtype), randn(c, 32, dtype=dtype),
                                                   randn(3, 16, dtype=dtype, grad=False),
                                                   randn(c, 16, dtype=dtype, grad=False), t, reduction=reduction,
                                                   chunk_size=2, backend=T, **opts)
            else:
                loss = lf.distillation_loss(randn(3, c, dtype=dtype), randn(3, c, dtype=dtype, grad=False), t,
                                            reduction=reduction, backend=T, **opts)
            backward(loss, 2.0)
        return run

    everything = dict(label_smoothing=0.1, weight=torch.rand(10000, generator=gen) + 0.5, focal_gamma=2.0,
                      focal_alpha=torch.rand(10000, generator=gen), z_loss=1e-4, softcap=30.0)
    small = {k: (v[:1000] if isinstance(v, torch.Tensor) else v) for k, v in everything.items()}
    return [
        # cross-entropy: one row block (C <= 8192) and chunked rows (C > 8192), each option family
        ("ce plain fp32 mean", ce(f32, 1000, "mean")),
        ("ce plain bf16 none", ce(bf16, 1000, "none", factor=2.0)),
        ("ce smoothing+weight bf16 mean", ce(bf16, 1000, "mean", label_smoothing=0.1, weight=small["weight"])),
        ("ce focal+alpha bf16 none", ce(bf16, 1000, "none", focal_gamma=2.0, focal_alpha=small["focal_alpha"])),
        ("ce z_loss+softcap bf16 mean", ce(bf16, 1000, "mean", z_loss=1e-4, softcap=30.0)),
        ("ce all options bf16 mean", ce(bf16, 1000, "mean", **small)),
        ("ce all options chunked bf16 mean", ce(bf16, 10000, "mean", **everything)),
        ("ce all options chunked fp32 none", ce(f32, 10000, "none", **everything)),
        ("ce plain chunked bf16 mean", ce(bf16, 10000, "mean")),
        ("ce probs bf16 mean", ce(bf16, 1000, "mean", soft=True)),
        ("ce probs smoothing+weight+z+softcap fp32 none", ce(f32, 1000, "none", soft=True, label_smoothing=0.1,
                                                              weight=small["weight"], z_loss=1e-4, softcap=30.0)),
        ("ce probs chunked bf16 mean", ce(bf16, 10000, "mean", soft=True, label_smoothing=0.1, softcap=30.0)),
        ("ce probs chunked fp32 none", ce(f32, 10000, "none", soft=True, z_loss=1e-4)),
        ("focal_loss bf16 mean", lambda: backward(lf.focal_loss(randn(3, 1000, dtype=bf16), classes(3, 1000),
                                                                gamma=2.0, backend=T))),
        # linear cross-entropy: logits in chunks of a shared buffer
        ("linear_ce bf16 mean smoothing", lce(bf16, "mean", label_smoothing=0.1)),
        ("linear_ce fp32 none z_loss", lce(f32, "none", z_loss=1e-4)),
        # RL heads: per-token log-probs and entropy (one block and chunked rows), distillation per divergence
        ("log_probs bf16", log_probs(bf16, 1000, temperature=0.7)),
        ("log_probs chunked fp32", log_probs(f32, 10000)),
        ("linear_log_probs bf16", log_probs(bf16, 1000, linear=True)),
        ("distillation kl bf16 mean", distillation(bf16, 1000, "mean", divergence="kl")),
        ("distillation reverse_kl fp32 none no target", distillation(f32, 1000, "none", target=False,
                                                                     divergence="reverse_kl", temperature=2.0)),
        ("distillation jsd chunked bf16 sum", distillation(bf16, 10000, "sum", divergence="jsd", beta=0.3)),
        ("distillation jsd bf16 none", distillation(bf16, 1000, "none", divergence="jsd")),
        ("linear_distillation kl bf16 mean", distillation(bf16, 1000, "mean", linear=True, divergence="kl")),
        # sigmoid focal: each gamma mode, alpha on/off, reduced and elementwise
        ("sigmoid_focal bf16 mean gamma=2", focal(bf16, "mean", alpha=0.25, gamma=2.0)),
        ("sigmoid_focal fp32 none gamma=1.5 no alpha", focal(f32, "none", alpha=-1.0, gamma=1.5)),
        ("sigmoid_focal bf16 sum gamma=0", focal(bf16, "sum", alpha=0.25, gamma=0.0)),
        # contrastive: each kind, symmetric or not, normalize on/off, each tile regime (D <= 128, 256, > 256);
        # fp32 once: its full-precision dots make the slowest compiles here
        ("info_nce symmetric normalized bf16 D=64", info_nce(bf16, 64, True, True)),
        ("info_nce one-way scale grad only fp32 D=64 M>B", info_nce(f32, 64, False, True, grads=("s",), m=12)),
        ("supcon normalized bf16 D=256", supcon(bf16, 256, True)),
        ("siglip raw bf16 D=512 key grad", siglip(bf16, 512, False, grads=("k",))),
        # the widths the spill budgets name: a row length that is a multiple of 8 only, 768 and 1024, each dtype
        ("info_nce symmetric normalized bf16 D=520", info_nce(bf16, 520, True, True)),
        ("info_nce symmetric normalized fp16 D=1024", info_nce(torch.float16, 1024, True, True)),
        ("info_nce symmetric normalized fp32 D=768", info_nce(f32, 768, True, True)),
        ("siglip normalized fp16 D=128", siglip(torch.float16, 128, True)),
        ("supcon normalized fp32 D=128", supcon(f32, 128, True)),
        # triplet: batch_hard (the kernel mining), each distance, with and without the row scale
        ("triplet euclidean bf16", triplet(bf16, 64)),
        ("triplet squared soft_margin fp32", triplet(f32, 64, distance="squared_euclidean", soft_margin=True)),
        ("triplet cosine bf16 D=600", triplet(bf16, 600, distance="cosine")),
        # 'mean' without a gradient: the kept-anchor count before the mining (a fused 'mean' takes the
        # mining's kept flags)
        ("triplet mean without gradient bf16", lambda: lf.triplet_loss(randn(12, 64, dtype=bf16, grad=False),
                                                                       classes(12, 3), backend=T)),
        # triplet semi_hard / batch_all, small classes: the register path (pair distances, the semi-hard
        # mining, the batch-all row pass and the list gradient)
        ("triplet semi_hard euclidean bf16", triplet(bf16, 64, mining="semi_hard")),
        ("triplet semi_hard euclidean bf16 D=520", triplet(bf16, 520, mining="semi_hard")),
        ("triplet batch_all hinge cosine fp32", triplet(f32, 64, mining="batch_all", distance="cosine")),
        ("triplet batch_all soft squared normalized bf16", triplet(bf16, 64, mining="batch_all", soft_margin=True,
                                                                   distance="squared_euclidean", normalize=True)),
        ("triplet batch_all hinge fp16 D=600", triplet(torch.float16, 600, mining="batch_all", reduction="sum")),
        ("triplet batch_all hinge bf16 D=600", triplet(bf16, 600, mining="batch_all", reduction="sum")),
        ("triplet batch_all hinge bf16 D=512", triplet(bf16, 512, mining="batch_all")),  # the whole-width pass
        ("triplet batch_all hinge fp32 D=512", triplet(f32, 512, mining="batch_all")),
        ("triplet batch_all soft euclidean normalized fp32 D=256", triplet(f32, 256, mining="batch_all",
                                                                          soft_margin=True, normalize=True)),
        # ... and a class of more than 17 rows: the chunked row kernel
        ("triplet semi_hard chunked bf16", lambda: backward(lf.triplet_loss(
            randn(40, 64, dtype=bf16), classes(40, 2), mining="semi_hard", backend=T), 2.0)),
        ("triplet batch_all chunked hinge cosine fp32", lambda: backward(lf.triplet_loss(
            randn(40, 64), classes(40, 2), mining="batch_all", distance="cosine", backend=T), 2.0)),
    ]


def _describe(value):
    """A launch argument as JSON: enough to rebuild an argument Triton specializes the same way."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "align": value.data_ptr() % 16}
    if value is None or isinstance(value, (bool, int, str)):
        return {"value": value}
    if isinstance(value, float):
        return {"value": value if math.isfinite(value) else repr(value), "float": True}
    raise TypeError(f"unexpected launch argument {value!r} ({type(value).__name__})")


def _rebuild(desc):
    import torch

    if "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        item = torch.empty((), dtype=dtype).element_size()
        return torch.empty(64, dtype=dtype)[desc["align"] // item:]  # same offset from a 64-byte aligned base
    if desc.get("float"):
        return float(desc["value"])
    return desc["value"]


# Compilation knobs that JITFunction.run passes to the binder as options, each only in the Triton
# versions that have it (fpsan_homomorphic_casts is not in Triton 3.6 or 3.7).
_LAUNCH_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")


def _launch_kwargs(jit_fn, kwargs):
    """What JITFunction.run adds before binding (so the specialization and options match a launch)."""
    from triton import knobs

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit_fn.debug) or knobs.runtime.debug
    for name in _LAUNCH_KNOBS:
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    return kwargs


_BINDERS = {}


def _specialize(jit_fn, args, kwargs, arch):
    """Triton's launch binding for a CUDA target: (backend, target, kwargs, bound args, specialization, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(jit_fn), arch)  # not the function itself: its hash walks its dependencies
    if key not in _BINDERS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        _BINDERS[key] = target, backend, create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    target, backend, binder = _BINDERS[key]
    kwargs = _launch_kwargs(jit_fn, kwargs)
    bound, spec, options = binder(*args, **kwargs)
    return backend, target, kwargs, bound, spec, options


def choose_as_on_a_gpu(set_attr=setattr, set_env=os.environ.__setitem__):
    """From a process under TRITON_INTERPRET=1: the launchers make their GPU choices from now on while
    the kernels still run in the interpreter and CPU tensors still go to the Triton ops (set_attr and
    set_env: monkeypatch's, to undo it after a test)."""
    import pkgutil

    import triton

    import lossforge_kernels as lf
    import lossforge_kernels.triton_kernels as package
    from lossforge_kernels import _backends

    assert triton.knobs.runtime.interpret, "must start under TRITON_INTERPRET=1"
    # Everything that reads TRITON_INTERPRET at import (jit decoration, the ops' CPU registration) first.
    for pkg in (package, lf.ops, lf.losses):
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    assert lf.available_backends()["triton"].available  # probed (and cached) while interpreting
    set_attr(triton.knobs.runtime, "interpret", True)  # any later @triton.jit still makes an InterpretedFunction
    set_env("TRITON_INTERPRET", "0")  # launchers: make the GPU choices
    set_attr(_backends, "triton_interpreter", lambda: True)  # dispatch: CPU tensors still go to the Triton ops


def _record(out_path):
    import torch  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    choose_as_on_a_gpu()
    configs = {}
    current = {"case": None}
    shadows = {}  # InterpretedFunction -> a JITFunction of the same source, for its parameters and binder
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self not in shadows:
            shadows[self] = JITFunction(self.fn, **self.kwargs)
        jit_fn = shadows[self]
        _, _, _, _, spec, options = _specialize(jit_fn, args, kwargs, ARCHS[0])
        kernel = f"{self.fn.__module__}:{self.fn.__qualname__}"
        key = json.dumps([kernel, [list(s) if isinstance(s, tuple) else s for s in spec],
                          sorted((k, repr(v)) for k, v in options.items())], default=repr)
        if key not in configs:
            names = [p.name for p in jit_fn.params]
            configs[key] = dict(
                kernel=kernel, args=[_describe(a) for a in args],
                kwargs={k: _describe(v) for k, v in kwargs.items()},
                constexprs={n: v for n, (t, v) in zip(names, spec) if t == "constexpr" and n in
                            {p.name for p in jit_fn.params if p.is_constexpr}},
                signature=[t for t, _ in spec], options={k: v for k, v in options.items()
                                                         if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")},
                cases=[])
        if current["case"] not in configs[key]["cases"]:
            configs[key]["cases"].append(current["case"])
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    failures, seconds = [], {}
    for name, run in _cases():
        current["case"] = name
        start = time.perf_counter()
        try:
            run()
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=6)}")
        seconds[name] = round(time.perf_counter() - start, 2)
    records = sorted(configs.values(), key=lambda c: (c["kernel"], json.dumps(c["constexprs"], default=repr)))
    with open(out_path, "w") as f:
        json.dump({"configs": records, "failures": failures, "seconds": seconds}, f, default=repr)


# ---- compiling: runs in a subprocess without the interpreter -----------------------------------------

def _resources(cubin):
    """(registers, local bytes per thread) of a cubin, from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return found.get("REG"), found.get("STACK", 0) + found.get("LOCAL", 0)


def _compile_one(job):
    """Compile one recorded configuration for one arch as a launch would: the same binder and packing."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    config, arch = job
    start = time.perf_counter()
    try:
        import triton
        from triton.compiler import ASTSource

        module, name = config["kernel"].split(":")
        jit_fn = getattr(importlib.import_module(module), name)
        assert type(jit_fn).__name__ == "JITFunction", f"{config['kernel']} is a {type(jit_fn).__name__}"
        args = [_rebuild(d) for d in config["args"]]
        kwargs = {k: _rebuild(d) for k, d in config["kwargs"].items()}
        backend, target, kwargs, bound, spec, options = _specialize(jit_fn, args, kwargs, arch)
        options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, spec, options)
        compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        regs, local = _resources(compiled.asm["cubin"])
        return dict(ok=True, arch=arch, regs=getattr(compiled, "n_regs", regs), local=local,
                    spills=getattr(compiled, "n_spills", local // 4), shared=compiled.metadata.shared,
                    cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.", compiled.asm["ptx"])),
                    seconds=time.perf_counter() - start)
    except Exception as exc:
        return dict(ok=False, arch=arch, error=f"{type(exc).__name__}: {exc}"[-6000:],
                    seconds=time.perf_counter() - start)


def _cost(config):
    """A rough compile-time order (largest first) so the pool does not end on a slow kernel: tiled
    kernels (two or more BLOCK sizes) by tile volume, then by warps."""
    blocks = [v for k, v in config["constexprs"].items() if k.startswith("BLOCK") and isinstance(v, int)]
    return (math.prod(blocks) if len(blocks) > 1 else 0, config["options"].get("num_warps", 4))


def _compile_all(in_path, out_path):
    with open(in_path) as f:
        configs = json.load(f)
    jobs = [(c, arch) for c in sorted(configs, key=_cost, reverse=True) for arch in ARCHS]
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        results = list(pool.map(_compile_one, jobs))
    out = {}
    for (config, _), result in zip(jobs, results):
        out.setdefault(config["id"], []).append(result)
    with open(out_path, "w") as f:
        json.dump(out, f)


# ---- the tests ----------------------------------------------------------------------------------------

def _missing_triton_internals():
    """The Triton internals this test drives (a launch's own binder and packing) that the installed Triton
    lacks; Triton 3.6 and the newest release have them all."""
    import triton.runtime.jit as jit

    have = {"triton.knobs": importlib.util.find_spec("triton.knobs") is not None,
            "create_function_from_signature": hasattr(jit, "create_function_from_signature"),
            "JITFunction._pack_args": hasattr(jit.JITFunction, "_pack_args")}
    return [name for name, ok in have.items() if not ok]


def _compile_problem():
    """Why an offline CUDA compile cannot run here, or None."""
    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas

        missing = _missing_triton_internals()
        if missing:
            return f"Triton {triton.__version__} lacks what this test drives: {', '.join(missing)}"
        paths = [get_ptxas(arch).path if get_ptxas.__code__.co_argcount else get_ptxas().path for arch in ARCHS]
    except Exception as exc:
        return f"no Triton CUDA backend or ptxas ({type(exc).__name__}: {exc})"
    bad = [p for p in paths if not (p and os.access(p, os.X_OK))]
    return f"ptxas not executable: {bad}" if bad else None


def _package_dir():
    return pathlib.Path(importlib.util.find_spec("lossforge_kernels.triton_kernels").submodule_search_locations[0])


def _env(interpret):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSFORGE_") or k == "LOSSFORGE_COMPILE_ARCHS"}
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _sources_hash():
    import triton
    import torch

    h = hashlib.sha256(f"{triton.__version__} {torch.__version__} {ARCHS}".encode())
    roots = [pathlib.Path(importlib.util.find_spec("lossforge_kernels").submodule_search_locations[0]), _package_dir()]
    for path in sorted(p for root in roots for p in root.rglob("*.py")) + [THIS]:
        h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()


def _run_recorder():
    from tests.conftest import interpreter_numpy_problem

    problem = interpreter_numpy_problem()
    if problem:  # the recording runs the kernels in the interpreter, on a GPU machine too
        return {"configs": [], "failures": [problem]}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records.json")
        proc = subprocess.run([sys.executable, str(THIS), "record", out], env=_env(True), capture_output=True,
                              text=True, timeout=RECORD_TIMEOUT_S)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"configs": [], "failures": [f"recorder exited {proc.returncode}:\n{proc.stderr[-6000:]}"]}
        with open(out) as f:
            return json.load(f)


def _short(value):
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)


def _label(config):
    """A readable id: kernel, pointer dtypes, constexprs that are set, warps and stages."""
    dtypes = sorted({t[1:] for t in config["signature"] if t.startswith("*")})
    parts = [config["kernel"].split(":")[1].strip("_").removesuffix("_kernel"), "+".join(dtypes)]
    for name, value in config["constexprs"].items():
        if value is True:
            parts.append(name)
        elif value is not False and value is not None:
            parts.append(f"{name}={_short(value)}")
    parts.append(f"w{config['options'].get('num_warps', 4)}s{config['options'].get('num_stages', '-')}")
    return "-".join(parts)


def _matches(config, fields):
    seen = dict(config["constexprs"], dtypes=",".join(sorted({t[1:] for t in config["signature"] if t[0] == "*"})),
                **config["options"])
    return all(seen.get(k) == v for k, v in fields.items())


def _labelled_records():
    records = _run_recorder()
    seen = {}
    for c in records["configs"]:
        label = _label(c)
        seen[label] = seen.get(label, 0) + 1
        c["id"] = label if seen[label] == 1 else f"{label}-{seen[label]}"
    return records


def _records(config):
    """The recorded configurations, each with a unique id; cached in pytest's cache by source hash."""
    import triton

    key, name = _sources_hash(), f"lossforge/triton_compile_records/triton-{triton.__version__}"
    cache = getattr(config, "cache", None)
    stored = cache.get(name, None) if cache else None
    if stored and stored.get("key") == key:
        return stored["records"]
    from tests.once import once_per_run  # (this file also runs as a script, without the package)

    records = once_per_run(f"triton-{triton.__version__}-records", _labelled_records)
    if cache and not records["failures"] and records["configs"]:
        cache.set(name, {"key": key, "records": records})
    return records


_PROBLEM = _compile_problem()
_STATE = {}


def pytest_generate_tests(metafunc):
    if "kernel_config" not in metafunc.fixturenames:
        return
    if _PROBLEM is not None:
        metafunc.parametrize("kernel_config", [pytest.param(None, marks=pytest.mark.skip(reason=_PROBLEM))],
                             ids=["skipped"])
        return
    _STATE["records"] = records = _records(metafunc.config)
    params = []
    for c in records["configs"]:
        marks = [pytest.mark.xfail(strict=True, reason=reason) for kernel, fields, reason in KNOWN_FAILURES
                 if c["kernel"].endswith(":" + kernel) and _matches(c, fields)]
        params.append(pytest.param(c, marks=marks, id=c["id"]))
    metafunc.parametrize("kernel_config", params or [pytest.param(None, id="nothing-recorded")])


@pytest.fixture(scope="module")
def records():
    if _PROBLEM is not None:
        pytest.skip(_PROBLEM)
    return _STATE.get("records") or _run_recorder()


@pytest.fixture(scope="module")
def compiled(records):
    """Every recorded configuration compiled (in a subprocess, in parallel); prints the resource table."""
    from tests.once import once_per_run

    start = time.perf_counter()
    results = once_per_run("triton-compiled", lambda: _compiled_configs(records["configs"]))
    wall = time.perf_counter() - start
    yield results
    _print_table(records["configs"], results, wall)


def _compiled_configs(configs):
    """The compile driver's results for these configurations (a subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "configs.json"), os.path.join(tmp, "compiled.json")
        with open(src, "w") as f:
            json.dump(configs, f)
        proc = subprocess.run([sys.executable, str(THIS), "compile", src, out], env=_env(False), capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        assert proc.returncode == 0 and os.path.exists(out), f"compile driver failed:\n{proc.stderr[-6000:]}"
        with open(out) as f:
            return json.load(f)


def _print_table(configs, results, wall):
    rows = [(c["id"], r) for c in configs for r in results.get(c["id"], [])]
    width = max([len(i) for i, _ in rows] + [10])
    print(f"\n\nTriton offline compiles: {len(configs)} configurations x {len(ARCHS)} arch(s), "
          f"{sum(r['seconds'] for _, r in rows):.0f} s of compiling, {wall:.0f} s wall")
    print(f"{'configuration':<{width}}  arch  regs  spills(local B)  smem B   secs")
    for ident, r in rows:
        if r["ok"]:
            print(f"{ident:<{width}}  sm{r['arch']}  {r['regs']:>4}  {r['spills']:>6} ({r['local']:>5})  "
                  f"{r['shared']:>6}  {r['seconds']:5.1f}")
        else:
            print(f"{ident:<{width}}  sm{r['arch']}  FAILED: {r['error'].splitlines()[0][:200]}")


def test_recording_ran_every_case(records):
    assert not records["failures"], "entry points failed while recording:\n" + "\n".join(records["failures"])


# Local memory (spilled registers) a thread may use, by kernel module (or module:kernel) and input dtype:
# the contrastive tiles (triton_kernels/contrastive.py GRAD_TILES, tiles_for) keep half inputs in
# registers and fp32 within 256 bytes; triplet's batch_all pass keeps half inputs in registers and fp32
# (its whole-width pass at D = 256 and 512, 8-24 B where B is not a multiple of 16) within 32 bytes.
SPILL_BUDGETS = {"contrastive": {"bf16": 0, "fp16": 0, "fp32": 256},
                 "triplet:_batch_all_kernel": {"bf16": 0, "fp16": 0, "fp32": 32}}


def _spill_budget(config):
    module = config["kernel"].split(":")[0].rsplit(".", 1)[-1]
    budgets = SPILL_BUDGETS.get(f"{module}:{config['kernel'].split(':')[1]}", SPILL_BUDGETS.get(module))
    if budgets is None:
        return None
    dtypes = {t[1:] for t in config["signature"] if t.startswith("*")}
    return budgets[next((d for d in ("bf16", "fp16") if d in dtypes), "fp32")]


def test_kernel_compiles(kernel_config, compiled):
    assert kernel_config is not None, "no launches were recorded"
    results = compiled[kernel_config["id"]]
    failed = [r for r in results if not r["ok"]]
    assert not failed, (f"{kernel_config['kernel']} failed to compile (cases: {kernel_config['cases']}; constexprs "
                        f"{kernel_config['constexprs']}; signature {kernel_config['signature']}; options "
                        f"{kernel_config['options']}):\n" + "\n".join(f"sm{r['arch']}: {r['error']}" for r in failed))
    budget = _spill_budget(kernel_config)
    if budget is not None:
        over = [r for r in results if r["local"] > budget]
        used = ", ".join(f"{r['local']} B (sm{r['arch']})" for r in over)
        assert not over, (f"{kernel_config['kernel']} uses {used} of local memory per thread, over its {budget} B "
                          f"(cases: {kernel_config['cases']})")


# Kernels whose main loop walks the features in K slices, and which launches of them do (batch_all's
# whole-width pass has no K loop): at a row length of 8 mod 16, passed as D / 8 (D_IN_EIGHTS) or as
# units of 8 (D_MULTIPLE), they keep the pipelined (cp.async) loads of a multiple of 16.
PIPELINED = {"triplet:_mine_kernel": lambda c: True, "triplet:_semi_hard_kernel": lambda c: True,
             "triplet:_batch_all_kernel": lambda c: not c["WHOLE"], "contrastive:_joint_stats_kernel": lambda c: True}


def test_odd_widths_keep_the_pipelined_loads(records, compiled):
    def key(config):
        return config["kernel"].rsplit(".", 1)[-1]

    odd = [c for c in records["configs"] if key(c) in PIPELINED and PIPELINED[key(c)](c["constexprs"])
           and (c["constexprs"].get("D_IN_EIGHTS") is True or c["constexprs"].get("D_MULTIPLE") == 8)]
    assert {key(c) for c in odd} == set(PIPELINED), "a kernel named here was not recorded at an odd width"
    for c in odd:
        for r in compiled[c["id"]]:
            assert r["ok"] and r["cp_async"] > 0, (f"{c['kernel']} (cases {c['cases']}) has no pipelined loads "
                                                   f"on sm{r['arch']}")


def _launch_targets():
    """Every @triton.jit function of the package that some code there launches as name[grid](...)."""
    targets = set()
    for path in sorted(_package_dir().glob("*.py")):
        tree = ast.parse(path.read_text())
        jitted = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and any(
            "jit" in ast.unparse(d) for d in node.decorator_list)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in jitted:
                targets.add(f"lossforge_kernels.triton_kernels.{path.stem}:{node.func.value.id}")
    return targets


def test_every_launched_kernel_is_compiled(records):
    targets = _launch_targets()
    assert targets, "found no kernel launches in the package"
    recorded = {c["kernel"] for c in records["configs"]}
    missing = sorted(targets - recorded)
    assert not missing, f"kernels the package launches that no recorded case reached (add a case): {missing}"
    assert recorded <= targets, f"launches of kernels not found statically: {sorted(recorded - targets)}"


@pytest.mark.parametrize("has_fpsan", [False, True], ids=["triton-3.6-knobs", "newer-knobs"])
def test_launch_options_follow_the_installed_knobs(monkeypatch, has_fpsan):
    """Only the knobs this Triton has reach the binder (Triton 3.6 has no fpsan_homomorphic_casts)."""
    knobs = pytest.importorskip("triton.knobs")
    compilation = types.SimpleNamespace(instrumentation_mode="")
    if has_fpsan:
        compilation.fpsan_homomorphic_casts = True
    monkeypatch.setattr(knobs, "compilation", compilation)
    kwargs = _launch_kwargs(types.SimpleNamespace(debug=False), {"num_warps": 4})
    expected = {"num_warps": 4, "debug": knobs.runtime.debug, "instrumentation_mode": ""}
    assert kwargs == (dict(expected, fpsan_homomorphic_casts=True) if has_fpsan else expected)


def test_a_triton_without_the_binder_is_named_in_the_skip(monkeypatch):
    jit = pytest.importorskip("triton.runtime.jit")
    monkeypatch.delattr(jit, "create_function_from_signature")
    assert _missing_triton_internals() == ["create_function_from_signature"]
    problem = _compile_problem()
    assert "create_function_from_signature" in problem or problem.startswith("no Triton CUDA backend"), problem


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != THIS.parent]  # no tests/ shadowing
    mode, *paths = sys.argv[1:]
    {"record": _record, "compile": _compile_all}[mode](*paths)

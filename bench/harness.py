"""One generic benchmark harness: suites are data (cases, providers, a bytes model); this runs them.

For every case it makes one set of random inputs, computes the expected loss (and gradient) with
the lossforge reference, then for every provider: warm-up, a correctness check against that
expectation, peak extra memory (GPU), and timed repetitions. A failing provider becomes an
"error: ..." row and the run carries on. The rows' table, CSV, Markdown and PNG: bench/report.py.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from typing import Callable

import numpy as np
import torch

COLUMNS = ("suite", "case", "provider", "mode", "shape", "dtype", "device", "status", "median_ms", "p20_ms",
           "p80_ms", "tb_per_s", "pct_copy", "extra_mb", "max_rel_err", "bytes_model", "timing", "reps",
           "copy_tb_per_s", "gpu_name", "torch_version", "triton_version", "date", "tflop_per_s", "pct_matmul",
           "flops_model", "matmul_tflop_per_s", "accum_mb")
MODES = ("fwd", "fwd+bwd")
LF_BACKENDS = ("cuda", "triton", "reference")
STANDARD_PROVIDERS = ("torch", "torch.compile") + tuple(f"lf-{b}" for b in LF_BACKENDS)
L2_FLUSH_BYTES = 256 << 20  # several times the L2 of current data-centre GPUs


class Unsupported(Exception):
    """Raised by Provider.bind for a case whose options the provider does not offer."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                # what distinguishes it within the suite, e.g. "z_loss=1e-4"
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str                # "fwd" (no grad) or "fwd+bwd"
    options: dict = dataclasses.field(default_factory=dict)  # loss keyword arguments, lossforge's names


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    bind: Callable[[Case], Callable[[dict], torch.Tensor]]  # case -> (inputs -> loss); may raise Unsupported
    mutates_input: bool = False  # e.g. writes the gradient into the logits: inputs are restored before each rep


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    cases: Callable[[str], list[Case]]                                  # profile -> cases
    make_inputs: Callable[[Case, torch.device, torch.Generator], dict]  # "input" (+ "target", "grad_output")
    providers: Callable[["Settings"], tuple[list[Provider], dict[str, str]]]  # usable, {skipped: why}
    reference: Callable[[Case, dict], torch.Tensor]                     # lossforge reference loss
    bytes_model: Callable[[Case], tuple[int, str]]                      # bytes moved, how they are counted
    provider_names: tuple[str, ...]  # every name providers() can return or skip, known without calling it
    grads: tuple[str, ...] | Callable[[Case], tuple[str, ...]] = ("input",)  # the inputs whose gradients a
    # fwd+bwd step returns (or case -> those names, where the cases differ)
    flops_model: Callable[[Case], tuple[int, str]] | None = None  # FLOPs, how counted: TFLOP/s, % of a product
    accum_mb: Callable[[Case, str], float] | None = None  # (case, provider) -> MB of it that are an accumulator
    tradeoff_plot: bool = False  # also draw time against extra memory (<suite>_memory.png)

    def graded(self, case: Case) -> tuple[str, ...]:
        return self.grads(case) if callable(self.grads) else self.grads


@dataclasses.dataclass
class Settings:
    device: torch.device
    profile: str            # "gpu", "gpu-quick", "cpu", "cpu-quick" or "tiny"
    warmup: int
    reps: int               # CPU: repetitions; GPU: the minimum
    budget_ms: float = 1000.0  # GPU: time to spend on one provider's repetitions
    graphs: bool = True
    warmup_limit_s: float = 300.0  # a provider whose warm-up (compilation) takes longer is dropped after it
    copy_rate: float = math.nan    # bytes/s of a device copy, measured at the start of the run
    matmul_rate: float = math.nan  # FLOP/s of a bf16 matrix product, measured when a suite counts FLOPs
    only: frozenset[str] | None = None  # provider names to run ("lf" selects every lf-*); None: all

    def wants(self, provider: str) -> bool:
        return self.only is None or provider in self.only or provider.split("-")[0] in self.only


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"device": gpu or "cpu", "gpu_name": gpu, "torch_version": torch.__version__,
            "triton_version": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---------------------------------------------------------------------------------------------
# Providers shared by every suite


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def lf_providers(call: Callable, device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """One provider per lossforge backend usable on `device`; call(lf, case, inputs, backend) -> loss."""
    try:
        import lossforge_kernels as lf
        backends = lf.available_backends()
    except Exception as exc:
        why = f"lossforge_kernels does not import: {type(exc).__name__}: {exc}"
        return [], {f"lf-{name}": why for name in LF_BACKENDS}
    usable, skipped = [], {}
    for name in LF_BACKENDS:
        info = backends[name]
        if not info.available:
            skipped[f"lf-{name}"] = info.reason
        elif device.type == "cpu" and name == "cuda":
            skipped[f"lf-{name}"] = "runs on CUDA tensors only"
        elif device.type == "cpu" and name == "triton" and not triton_interpreter():
            skipped[f"lf-{name}"] = "CPU tensors need TRITON_INTERPRET=1"
        else:
            usable.append(Provider(f"lf-{name}", functools.partial(_bind_lf, call, lf, name)))
    return usable, skipped


def _bind_lf(call, lf, backend, case):
    return lambda inputs: call(lf, case, inputs, backend)


@functools.cache
def compile_problem(device_type: str, timeout_s: float) -> str | None:
    """Why torch.compile cannot be benchmarked here, or None. On CPU, a one-line compile in a
    subprocess proves that a C++ compiler works and compilation ends within the limit."""
    if device_type != "cpu":
        return None  # on a GPU a failure is recorded per case
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler found (torch.compile on CPU needs one)"
    code = "import torch; f = torch.compile(lambda x: torch.log_softmax(x, -1).sum()); f(torch.randn(3, 5)).item()"
    try:
        subprocess.run([sys.executable, "-c", code], timeout=timeout_s, capture_output=True, text=True, check=True)
    except subprocess.TimeoutExpired:
        return f"compiling a one-line function took over {timeout_s:.0f} s"
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or "").strip().splitlines()
        return "torch.compile failed: " + (lines[-1] if lines else f"exit status {exc.returncode}")
    return None


def compile_provider(eager: Provider, settings: Settings) -> Provider | str:
    """torch.compile of the eager provider's function, or the reason it is skipped."""
    if not settings.wants("torch.compile"):
        return "not selected"  # and not probed: the probe compiles in a subprocess
    problem = compile_problem(settings.device.type, settings.warmup_limit_s)
    if problem:
        return problem

    def bind(case):
        fn = eager.bind(case)
        torch._dynamo.reset()  # every case is a new closure of one code object: avoid the recompile limit
        return torch.compile(fn, dynamic=False)

    return Provider("torch.compile", bind)


def imported(module: str, name: str, settings: Settings, runs_on_cuda_only: str | None = None):
    """A third party's function, or why it is not benchmarked here: not installed, or (for a library
    named by `runs_on_cuda_only`) not on CUDA tensors."""
    if runs_on_cuda_only and settings.device.type != "cuda":
        return f"{runs_on_cuda_only} runs on CUDA tensors only"
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"


def standard_providers(settings: Settings, eager_bind: Callable, lf_call: Callable,
                       *third_parties: tuple[str, Callable[[Settings], Provider | str]]
                       ) -> tuple[list[Provider], dict[str, str]]:
    """(usable, {skipped: why}) in the standard order: torch, torch.compile, lf-cuda, lf-triton,
    lf-reference, then each (name, make) third party; make(settings) returns its Provider or why
    not, and is only called for a wanted name (it may import a heavy package)."""
    eager = Provider("torch", eager_bind)
    usable, skipped = [eager], {}
    _add(usable, skipped, "torch.compile", compile_provider(eager, settings))
    lf_usable, lf_skipped = lf_providers(lf_call, settings.device)
    usable += lf_usable
    skipped.update(lf_skipped)
    for name, make in third_parties:
        _add(usable, skipped, name, make(settings) if settings.wants(name) else "not selected")
    return usable, skipped


def _add(usable, skipped, name, provider_or_reason):
    if isinstance(provider_or_reason, Provider):
        usable.append(provider_or_reason)
    else:
        skipped[name] = provider_or_reason


# ---------------------------------------------------------------------------------------------
# Measuring one provider on one case


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _generator(suite: str, case: Case, device: torch.device) -> torch.Generator:
    seed = zlib.crc32(f"{suite}/{case.name}/{case.mode}/{case.shape}".encode())
    return torch.Generator(device=device).manual_seed(seed)


def _step(fn, case, inputs):
    """The timed unit of work: the loss, plus its backward in fwd+bwd mode."""
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(inputs)
        return step

    def step():
        _backward(fn(inputs), inputs.get("grad_output"))
    return step


def _backward(loss, grad_output):
    if grad_output is not None and grad_output.dtype != loss.dtype:
        grad_output = grad_output.to(loss.dtype)
    loss.backward(grad_output)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return math.inf
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def _expected(suite: Suite, case: Case, inputs: dict):
    """(loss, gradients or None) from the lossforge reference on private copies of the inputs."""
    grads = suite.graded(case) if case.mode == "fwd+bwd" else ()
    ref_inputs = dict(inputs, **{k: inputs[k].detach().clone().requires_grad_(True) for k in grads})
    if case.mode == "fwd":
        with torch.no_grad():
            return suite.reference(case, ref_inputs), None
    loss = suite.reference(case, ref_inputs)
    _backward(loss, inputs.get("grad_output"))
    return loss.detach(), [ref_inputs[k].grad for k in grads]


def _check(fn, suite, case, inputs, reset, expected) -> float:
    """The largest relative error of the loss and of each returned gradient."""
    reset()
    loss_want, grads_want = expected
    if case.mode == "fwd":
        with torch.no_grad():
            return rel_err(fn(inputs), loss_want)
    loss = fn(inputs)
    _backward(loss, inputs.get("grad_output"))
    got = [loss] + [inputs[k].grad for k in suite.graded(case)]
    return max(rel_err(a, e) if a is not None else math.inf for a, e in zip(got, [loss_want] + grads_want))


def _extra_mb(step, tensors, reset) -> float:
    """Peak memory one step allocates beyond its inputs and, in fwd+bwd, the gradients it returns."""
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    for x in tensors:
        g = x.grad
        if g is not None and g.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            extra -= g.numel() * g.element_size()  # a gradient written into the input's buffer costs nothing
    return extra / 2**20


def _capture(step, reset) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs the step warmed up on a side stream first
        for _ in range(2):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    reset()  # grad None: the captured backward assigns the gradient instead of accumulating into it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _event_times(run, before, flush, n) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        before()
        flush.zero_()  # evict the inputs from L2, outside the timed region
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _time_gpu(step, reset, settings):
    run, before, method, graph = step, reset, "launches, L2 flushed", None
    if settings.graphs:
        try:
            graph = _capture(step, reset)
            run, method = graph.replay, "cuda graph, L2 flushed"
            before = functools.partial(reset, clear_grad=False)  # the graph owns the gradient buffer
        except Exception as exc:
            torch.cuda.synchronize()
            method = f"launches, L2 flushed (no graph: {type(exc).__name__})"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=settings.device)
    estimate = float(np.median(_event_times(run, before, flush, 3)))
    reps = int(min(max(settings.budget_ms / max(estimate, 1e-3), settings.reps), 200))
    times = _event_times(run, before, flush, reps)
    del graph
    return times, method


def _time_cpu(step, reset, settings):
    times = []
    for _ in range(settings.reps):
        reset()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, "perf_counter"


def _measure(provider, suite, case, inputs, expected, settings, nbytes) -> dict:
    fn = provider.bind(case)
    x = inputs["input"]
    graded = [inputs[k] for k in suite.graded(case)]
    pristine = x.detach().clone() if provider.mutates_input else None

    def reset(clear_grad=True):
        if clear_grad:
            for t in graded:
                t.grad = None
        if pristine is not None:
            with torch.no_grad():
                x.copy_(pristine)

    step = _step(fn, case, inputs)
    t0 = time.perf_counter()
    for _ in range(settings.warmup):
        reset()
        step()
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    out = {"max_rel_err": math.nan if expected is None else _check(fn, suite, case, inputs, reset, expected),
           "extra_mb": _extra_mb(step, graded, reset) if settings.device.type == "cuda" else math.nan}
    times, method = (_time_gpu if settings.device.type == "cuda" else _time_cpu)(step, reset, settings)
    p20, median, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    tbs = nbytes / (median / 1e3) / 1e12
    if provider.name == "lf-triton" and settings.device.type == "cpu":
        method += ", Triton interpreter"
    out.update(status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, tb_per_s=tbs,
               pct_copy=100 * tbs * 1e12 / settings.copy_rate, timing=method, reps=len(times),
               warmup_s=warmup_s)
    if suite.flops_model is not None:
        flops, _ = suite.flops_model(case)
        out.update(tflop_per_s=flops / (median / 1e3) / 1e12, pct_matmul=100 * flops / (median / 1e3) /
                   settings.matmul_rate)
    if suite.accum_mb is not None:
        out["accum_mb"] = suite.accum_mb(case, provider.name)
    return out


def short_error(exc: BaseException, limit: int = 90) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return "error: " + (text if len(text) <= limit else text[:limit - 3] + "...")


def _progress(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_ms']:.4g} ms [p20 {row['p20_ms']:.4g}, p80 {row['p80_ms']:.4g}]"


def run_suite(suite: Suite, settings: Settings, env: dict, log=print) -> list[dict]:
    providers, skipped = suite.providers(settings)
    providers = [p for p in providers if settings.wants(p.name)]
    for name, why in skipped.items():
        if settings.wants(name):
            log(f"[{suite.name}] skipping provider {name}: {why}")
    if not providers:
        return []  # nothing to measure: build no inputs or references
    too_slow: dict[str, str] = {}
    rows = []
    for case in suite.cases(settings.profile):
        inputs = suite.make_inputs(case, settings.device, _generator(suite.name, case, settings.device))
        nbytes, model = suite.bytes_model(case)
        try:
            expected = _expected(suite, case, inputs)
        except Exception as exc:
            log(f"[{suite.name}] {case.name}: no reference to check against ({short_error(exc)})")
            expected = None
        for provider in providers:
            row = {k: "" for k in COLUMNS}
            row.update(env, suite=suite.name, case=case.name, provider=provider.name, mode=case.mode,
                       shape=shape_str(case.shape), dtype=str(case.dtype).removeprefix("torch."),
                       bytes_model=model, copy_tb_per_s=settings.copy_rate / 1e12)
            if suite.flops_model is not None:
                row.update(flops_model=suite.flops_model(case)[1], matmul_tflop_per_s=settings.matmul_rate / 1e12)
            try:
                if provider.name in too_slow:
                    row["status"] = too_slow[provider.name]
                else:
                    row.update(_measure(provider, suite, case, inputs, expected, settings, nbytes))
                    if row["warmup_s"] > settings.warmup_limit_s:
                        too_slow[provider.name] = (f"skipped: warm-up took {row['warmup_s']:.0f} s on an earlier "
                                                   f"case (limit {settings.warmup_limit_s:.0f} s)")
            except Unsupported as exc:
                row["status"] = f"unsupported: {exc}"
            except Exception as exc:
                row["status"] = short_error(exc)
            finally:
                for k in suite.graded(case):
                    inputs[k].grad = None
                if settings.device.type == "cuda":
                    torch.cuda.empty_cache()
            row.pop("warmup_s", None)
            log(f"[{suite.name}] {case.name} {case.mode} {row['shape']} {provider.name}: {_progress(row)}")
            rows.append(row)
        del inputs, expected
    return rows

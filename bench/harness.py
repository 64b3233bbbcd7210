"""One generic benchmark harness: suites are data (cases, providers, a bytes model); this runs them.

For every case it makes one set of random inputs, computes the expected loss (and gradient) with
the lossforge reference, then for every provider: warm-up, a correctness check against that
expectation, peak extra memory (GPU), and timed repetitions. Output: a printed table, one CSV
upserted across runs, a Markdown table and one PNG per suite. A failing provider becomes an
"error: ..." row and the run carries on.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
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
           "copy_tb_per_s", "gpu_name", "torch_version", "triton_version", "date")
KEY = ("suite", "case", "provider", "mode", "shape", "dtype", "device")
MODES = ("fwd", "fwd+bwd")
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
        return [], {"lf-*": f"lossforge_kernels does not import: {type(exc).__name__}: {exc}"}
    usable, skipped = [], {}
    for name in ("cuda", "triton", "reference"):
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


def collect(*entries) -> tuple[list[Provider], dict[str, str]]:
    """Providers in order from (name, Provider-or-reason) pairs and (providers, skipped) pairs."""
    usable, skipped = [], {}
    for first, second in entries:
        if isinstance(first, list):
            usable += first
            skipped.update(second)
        elif isinstance(second, Provider):
            usable.append(second)
        else:
            skipped[first] = second
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
    """(loss, gradient or None) from the lossforge reference on a private copy of the input."""
    x = inputs["input"].detach().clone().requires_grad_(case.mode == "fwd+bwd")
    ref_inputs = dict(inputs, input=x)
    if case.mode == "fwd":
        with torch.no_grad():
            return suite.reference(case, ref_inputs), None
    loss = suite.reference(case, ref_inputs)
    _backward(loss, inputs.get("grad_output"))
    return loss.detach(), x.grad


def _check(fn, case, inputs, reset, expected) -> float:
    reset()
    x = inputs["input"]
    if case.mode == "fwd":
        with torch.no_grad():
            got = [fn(inputs)]
    else:
        loss = fn(inputs)
        _backward(loss, inputs.get("grad_output"))
        got = [loss, x.grad]
    return max(rel_err(a, e) for a, e in zip(got, expected) if e is not None)


def _extra_mb(step, x, reset) -> float:
    """Peak memory one step allocates beyond its inputs and, in fwd+bwd, the gradient it returns."""
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
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


def _measure(provider, case, inputs, expected, settings, nbytes) -> dict:
    fn = provider.bind(case)
    x = inputs["input"]
    pristine = x.detach().clone() if provider.mutates_input else None

    def reset(clear_grad=True):
        if clear_grad:
            x.grad = None
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
    out = {"max_rel_err": math.nan if expected is None else _check(fn, case, inputs, reset, expected),
           "extra_mb": _extra_mb(step, x, reset) if settings.device.type == "cuda" else math.nan}
    times, method = (_time_gpu if settings.device.type == "cuda" else _time_cpu)(step, reset, settings)
    p20, median, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    tbs = nbytes / (median / 1e3) / 1e12
    if provider.name == "lf-triton" and settings.device.type == "cpu":
        method += ", Triton interpreter"
    out.update(status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, tb_per_s=tbs,
               pct_copy=100 * tbs * 1e12 / settings.copy_rate, timing=method, reps=len(times),
               warmup_s=warmup_s)
    return out


def short_error(exc: BaseException, limit: int = 90) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return "error: " + (text if len(text) <= limit else text[:limit - 3] + "...")


def run_suite(suite: Suite, settings: Settings, env: dict, log=print) -> list[dict]:
    providers, skipped = suite.providers(settings)
    providers = [p for p in providers if settings.wants(p.name)]
    for name, why in skipped.items():
        if settings.wants(name):
            log(f"[{suite.name}] skipping provider {name}: {why}")
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
            try:
                if provider.name in too_slow:
                    row["status"] = too_slow[provider.name]
                else:
                    row.update(_measure(provider, case, inputs, expected, settings, nbytes))
                    if row["warmup_s"] > settings.warmup_limit_s:
                        too_slow[provider.name] = (f"skipped: warm-up took {row['warmup_s']:.0f} s on an earlier "
                                                   f"case (limit {settings.warmup_limit_s:.0f} s)")
            except Unsupported as exc:
                row["status"] = f"unsupported: {exc}"
            except Exception as exc:
                row["status"] = short_error(exc)
            finally:
                inputs["input"].grad = None
                if settings.device.type == "cuda":
                    torch.cuda.empty_cache()
            row.pop("warmup_s", None)
            log(f"[{suite.name}] {case.name} {case.mode} {row['shape']} {provider.name}: {_cell_time(row)}")
            rows.append(row)
        del inputs, expected
    return rows


# ---------------------------------------------------------------------------------------------
# Output: table, CSV, Markdown, PNG


def _num(v, fmt):
    return "" if v == "" or v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _cell_time(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_ms']:.4g} [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]"


def format_table(rows: list[dict]) -> str:
    head = ("suite", "case", "provider", "mode", "shape", "dtype", "median ms", "p20", "p80", "TB/s", "% copy",
            "extra MB", "rel err")
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        timing = ([_num(r[k], ".4g") for k in ("median_ms", "p20_ms", "p80_ms")] if ok
                  else [r["status"][:60], "", ""])
        body.append((r["suite"], r["case"], r["provider"], r["mode"], r["shape"], r["dtype"], *timing,
                     _num(r["tb_per_s"], ".3g"), _num(r["pct_copy"], ".1f"), _num(r["extra_mb"], ".1f"),
                     _num(r["max_rel_err"], ".1e")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line("-" * w for w in widths)] + [line(b) for b in body])


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def upsert_csv(path: str, rows: list[dict]) -> None:
    """Rows with the same KEY as an existing row replace it; others are appended."""
    table: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for old in csv.DictReader(f):
                table[tuple(old.get(k, "") for k in KEY)] = old
    for r in rows:
        table[tuple(str(r[k]) for k in KEY)] = {k: _csv_value(r[k]) for k in COLUMNS}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(table.values())


_NUMERIC = ("median_ms", "p20_ms", "p80_ms", "tb_per_s", "pct_copy", "extra_mb", "max_rel_err", "copy_tb_per_s")


def read_csv(path: str) -> list[dict]:
    """The rows of a results CSV, numbers as floats (NaN where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMERIC:
            r[k] = float(r[k]) if r.get(k, "") != "" else math.nan
    return rows


def row_environment(row: dict) -> dict:
    """The environment a CSV row was measured in, as environment() describes it."""
    return {"device": row["gpu_name"] or row["device"], "torch_version": row["torch_version"],
            "triton_version": row["triton_version"], "date": row["date"]}


def report_markdown(rows: list[dict]) -> str:
    """results.md for rows that may come from several runs: one section per suite, each headed by
    the GPU, versions, date and copy rate its rows were measured with."""
    parts = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        mine = [r for r in rows if r["suite"] == suite]
        parts.append(format_markdown(mine, row_environment(mine[0]), mine[0]["copy_tb_per_s"] * 1e12))
    return "\n".join(parts)


def _describe(env: dict, copy_rate: float) -> str:
    return (f"{env['device']}, torch {env['torch_version']}, triton {env['triton_version']}, {env['date']}; "
            f"device copy {copy_rate / 1e12:.3g} TB/s (read + write)")


def format_markdown(rows: list[dict], env: dict, copy_rate: float) -> str:
    out = [f"Measured on {_describe(env, copy_rate)}. Median ms [p20, p80]; TB/s from the bytes model; "
           "extra MB = peak memory beyond the inputs and the returned gradient; rel err = loss and gradient "
           "against the lossforge reference.", ""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        out += [f"### {suite}", "", "| case | provider | mode | shape | dtype | ms | TB/s | % copy | extra MB "
                "| rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["suite"] == suite):
            cells = (r["case"], r["provider"], r["mode"], r["shape"], r["dtype"], _cell_time(r),
                     _num(r["tb_per_s"], ".3g"), _num(r["pct_copy"], ".1f"), _num(r["extra_mb"], ".1f"),
                     _num(r["max_rel_err"], ".1e"))
            out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        models = dict.fromkeys(r["bytes_model"] for r in rows if r["suite"] == suite)
        out += ["", "Bytes model: " + "; ".join(models), ""]
    return "\n".join(out)


def plot_suite(path: str, suite: str, rows: list[dict], env: dict) -> None:
    """Grouped bars: median ms per case and provider, p20-p80 error bars, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["suite"] == suite]
    groups = list(dict.fromkeys((r["case"], r["mode"], r["shape"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.8))
    width = 0.8 / max(len(providers), 1)
    for j, provider in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for i, group in enumerate(groups):
            for r in rows:
                if (r["case"], r["mode"], r["shape"]) != group or r["provider"] != provider:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                if r["status"] != "ok":  # mark the gap so a missing bar is not read as "not run"
                    ax.text(x, 0.02, r["status"].split(":")[0], transform=ax.get_xaxis_transform(), rotation=90,
                            ha="center", va="bottom", fontsize=6)
                    continue
                xs.append(x)
                ys.append(r["median_ms"])
                lo.append(r["median_ms"] - r["p20_ms"])
                hi.append(r["p80_ms"] - r["median_ms"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=provider)
    ax.set_xticks(range(len(groups)), [f"{c}\n{m}\n{s}" for c, m, s in groups], fontsize=7)
    if any(r["status"] == "ok" for r in rows):
        ax.set_yscale("log")
    ax.set_ylabel("median ms (bars: p20-p80), lower is better")
    ax.set_title(f"{suite}: {env['device']}, torch {env['torch_version']}, triton {env['triton_version']}, "
                 f"{env['date']}", fontsize=9)
    if providers:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

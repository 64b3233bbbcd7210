"""Command line: python -m bench [--suite a,b] [--providers p,q] [--quick] [--out DIR] [--no-plot] [--report]."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

from . import ceilings, harness, report


def suites(folder: str = os.path.dirname(os.path.abspath(__file__)), package: str = __package__) -> dict:
    """Name -> Suite of every public module of the bench package that defines a SUITE, in their ORDER."""
    found = []
    for info in pkgutil.iter_modules([folder]):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if hasattr(module, "SUITE"):
            if not hasattr(module, "ORDER"):
                raise ImportError(f"{module.__name__} has a SUITE but no ORDER: say where it runs among the suites")
            found.append((module.ORDER, module.SUITE.name, module.SUITE))
    return {name: suite for _, name, suite in sorted(found, key=lambda item: item[:2])}


SUITES = suites()
PROVIDERS = tuple(dict.fromkeys(n for s in SUITES.values() for n in s.provider_names))
FAMILIES = tuple(dict.fromkeys(n.split("-")[0] for n in PROVIDERS if "-" in n))  # "lf" selects every lf-*
KNOWN_PROVIDERS = ", ".join(PROVIDERS) + "".join(f"; '{f}' selects every {f}-*" for f in FAMILIES)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
# profile -> (warm-up calls, repetitions (the minimum on a GPU), GPU ms budget per provider)
PROFILES = {"gpu": (3, 10, 1000.0), "gpu-quick": (2, 5, 300.0), "cpu": (2, 10, 0.0), "cpu-quick": (1, 5, 0.0),
            "tiny": (1, 2, 0.0)}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the lossforge_kernels losses "
                                "against stock torch, torch.compile and other libraries (see bench/__init__.py "
                                "for how rows are timed).")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated, from: {', '.join(SUITES)}")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated, from: {KNOWN_PROVIDERS}; default: all available")
    p.add_argument("--quick", action="store_true", help="a reduced set of cases and repetitions")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG files")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--no-graph", action="store_true", help="time GPU steps as plain launches, not graph replays")
    p.add_argument("--warmup-limit", type=float, default=None, metavar="S",
                   help="drop a provider whose warm-up (compilation) takes over S seconds (default 300 GPU, "
                        "120 CPU)")
    p.add_argument("--report", action="store_true",
                   help="measure nothing: rebuild results.md and the PNGs in --out from its results.csv "
                        "(rows accumulated over several runs, each section with its own environment)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # odd tiny shapes for the smoke test
    args = p.parse_args(argv)
    unknown = [s for s in args.suite.split(",") if s not in SUITES]
    if unknown:
        p.error(f"--suite: unknown suite(s) {unknown}; expected some of {list(SUITES)}")
    unknown = [n for n in args.providers.split(",") if n not in PROVIDERS + FAMILIES] if args.providers else []
    if unknown:
        p.error(f"--providers: unknown provider(s) {unknown}; known: {KNOWN_PROVIDERS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    return args


def rebuild(out: str, plot: bool = True) -> int:
    rows = report.read_csv(os.path.join(out, "results.csv"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.report_markdown(rows) + "\n")
    if plot:
        for name in dict.fromkeys(r["suite"] for r in rows):
            mine = [r for r in rows if r["suite"] == name]
            _plot(out, name, mine, report.row_environment(mine[0]))
    print(f"rebuilt {out}/results.md{' and the PNGs' if plot else ''} from {len(rows)} rows of results.csv")
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.report:
        return rebuild(args.out, plot=not args.no_plot)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    profile = "tiny" if args.tiny else ("gpu" if use_cuda else "cpu") + ("-quick" if args.quick else "")
    warmup, reps, budget = PROFILES[profile]
    limit = args.warmup_limit if args.warmup_limit is not None else (300.0 if use_cuda else 120.0)
    only = frozenset(args.providers.split(",")) if args.providers else None
    settings = harness.Settings(device, profile, warmup, reps, budget, graphs=not args.no_graph,
                                warmup_limit_s=limit, only=only)
    if not use_cuda:
        print("no CUDA GPU: CPU timings of small shapes; not comparable with GPU results")
    env = harness.environment(device)
    settings.copy_rate = ceilings.copy_bytes_per_s(device, 4 << 20 if args.tiny else None)
    print(f"device: {env['device']}; torch {env['torch_version']}; triton {env['triton_version']}; "
          f"copy rate {settings.copy_rate / 1e12:.3g} TB/s (read + write)")
    if any(SUITES[name].flops_model is not None for name in args.suite.split(",")):
        settings.matmul_rate = ceilings.matmul_flops_per_s(device, 64 if args.tiny else None)
        print(f"matrix-product rate {settings.matmul_rate / 1e12:.4g} TFLOP/s")

    rows = []
    for name in args.suite.split(","):
        mine = harness.run_suite(SUITES[name], settings, env)
        if not mine:
            print(f"[{name}] none of the requested providers ran")
        rows += mine
    if only is not None:
        missing = only - {r["provider"] for r in rows} - {r["provider"].split("-")[0] for r in rows}
        if missing:
            print(f"requested provider(s) not run: {sorted(missing)} (not in the chosen suites or unavailable "
                  "here, see above)")
    if not rows:
        print(f"nothing measured: {args.out} left as it was")
        return 1
    _write_outputs(args.out, rows, env, settings.copy_rate, plot=not args.no_plot)
    return 0


def _write_outputs(out: str, rows: list[dict], env: dict, copy_rate: float, plot: bool) -> None:
    print()
    print(report.format_table(rows))
    os.makedirs(out, exist_ok=True)
    report.upsert_csv(os.path.join(out, "results.csv"), rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.format_markdown(rows, env, copy_rate) + "\n")
    if plot:
        for name in dict.fromkeys(r["suite"] for r in rows):
            _plot(out, name, rows, env)
    errors = sum(r["status"].startswith("error") for r in rows)
    print(f"\nwrote {out}/results.csv, results.md{' and a PNG per suite' if plot else ''}; "
          f"{len(rows)} rows, {errors} with errors")


def _plot(out: str, name: str, rows: list[dict], env: dict) -> None:
    try:
        report.plot_suite(os.path.join(out, f"{name}.png"), name, rows, env)
        if name in SUITES and SUITES[name].tradeoff_plot:
            report.plot_tradeoff(os.path.join(out, f"{name}_memory.png"), name, rows, env)
    except ImportError as exc:
        print(f"no plot for {name}: {exc}")


if __name__ == "__main__":
    sys.exit(main())

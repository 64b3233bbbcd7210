"""The bench's outputs: a printed table, one CSV upserted across runs, results.md and a PNG per suite.

Rows are the dicts harness.run_suite returns (harness.COLUMNS); nothing here measures.
"""
from __future__ import annotations

import csv
import math
import os

from .harness import COLUMNS

KEY = ("suite", "case", "provider", "mode", "shape", "dtype", "device")  # a CSV row's identity across runs


def _num(v, fmt):
    return "" if v == "" or v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _cell_time(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_ms']:.4g} [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]"


def _has(rows, key) -> bool:
    return any(_num(r.get(key, ""), "g") != "" for r in rows)


def format_table(rows: list[dict]) -> str:
    flops = _has(rows, "tflop_per_s")
    head = ("suite", "case", "provider", "mode", "shape", "dtype", "median ms", "p20", "p80", "TB/s", "% copy") + \
        (("TFLOP/s", "% mm") if flops else ()) + ("extra MB", "rel err")
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        timing = ([_num(r[k], ".4g") for k in ("median_ms", "p20_ms", "p80_ms")] if ok
                  else [r["status"][:60], "", ""])
        rates = (_num(r.get("tflop_per_s", ""), ".4g"), _num(r.get("pct_matmul", ""), ".1f")) if flops else ()
        body.append((r["suite"], r["case"], r["provider"], r["mode"], r["shape"], r["dtype"], *timing,
                     _num(r["tb_per_s"], ".3g"), _num(r["pct_copy"], ".1f"), *rates, _num(r["extra_mb"], ".1f"),
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


_NUMERIC = ("median_ms", "p20_ms", "p80_ms", "tb_per_s", "pct_copy", "extra_mb", "max_rel_err", "copy_tb_per_s",
            "tflop_per_s", "pct_matmul", "matmul_tflop_per_s", "accum_mb")


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
           "extra MB = peak memory beyond the inputs and the returned gradients; rel err = loss and gradients "
           "against the lossforge reference.", ""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        mine = [r for r in rows if r["suite"] == suite]
        out += [f"### {suite}", ""] + (_flops_table(mine) if _has(mine, "tflop_per_s") else _bytes_table(mine))
    return "\n".join(out)


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _bytes_table(rows):
    out = ["| case | provider | mode | shape | dtype | ms | TB/s | % copy | extra MB | rel err |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(_row((r["case"], r["provider"], r["mode"], r["shape"], r["dtype"], _cell_time(r),
                         _num(r["tb_per_s"], ".3g"), _num(r["pct_copy"], ".1f"), _num(r["extra_mb"], ".1f"),
                         _num(r["max_rel_err"], ".1e"))))
    return out + ["", "Bytes model: " + "; ".join(dict.fromkeys(r["bytes_model"] for r in rows)), ""]


def _flops_table(rows):
    """Suites bound by matrix products: TFLOP/s and % of a bf16 product measured in the same run, and
    how much of the extra memory is an fp32 gradient accumulator."""
    ceiling = next((r["matmul_tflop_per_s"] for r in rows if _num(r.get("matmul_tflop_per_s", ""), "g")), math.nan)
    out = [f"Matrix-product ceiling {_num(ceiling, '.4g')} TFLOP/s, measured in the same run (bench/ceilings.py: "
           "bf16 8192^3 on a GPU, fp32 512^3 on a CPU).", "",
           "| case | provider | mode | shape | dtype | ms | TFLOP/s | % matmul | extra MB | of which fp32 accumulator "
           "MB | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(_row((r["case"], r["provider"], r["mode"], r["shape"], r["dtype"], _cell_time(r),
                         _num(r.get("tflop_per_s", ""), ".4g"), _num(r.get("pct_matmul", ""), ".1f"),
                         _num(r["extra_mb"], ".1f"), _num(r.get("accum_mb", ""), ".1f"),
                         _num(r["max_rel_err"], ".1e"))))
    return out + ["", "FLOPs model: " + "; ".join(dict.fromkeys(r["flops_model"] for r in rows)), ""]


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


def plot_tradeoff(path: str, suite: str, rows: list[dict], env: dict) -> None:
    """Median ms against extra memory, one point per provider and case (our chunk sizes among them):
    the trade-off a user chooses on. Only fwd+bwd rows measured on a GPU (with a memory figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["suite"] == suite and r["status"] == "ok" and r["mode"] == "fwd+bwd"
            and _num(r["extra_mb"], "g") != ""]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == provider]
        ax.scatter([max(r["extra_mb"], 0.1) for r in mine], [r["median_ms"] for r in mine], label=provider, s=18)
        for r in mine:
            ax.annotate(f"{r['case']} {r['shape']}", (max(r["extra_mb"], 0.1), r["median_ms"]), fontsize=5,
                        xytext=(3, 2), textcoords="offset points")
    if rows:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("extra memory of one fwd+bwd step, MB (log)")
    ax.set_ylabel("median ms (log), lower is better")
    ax.set_title(f"{suite}: time against memory; {env['device']}, torch {env['torch_version']}, {env['date']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

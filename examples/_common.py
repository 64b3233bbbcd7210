"""What every example shares: one training run per loss implementation from the same seed, its
step times and peak memory, and the curves written as a CSV and a PNG."""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch


def arguments(description: str, steps: int, argv=None, **sizes) -> argparse.Namespace:
    """--steps, --device, --out and one option per size (e.g. --batch 4096)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--backend", default="auto", help="lossforge backend (auto, cuda, triton, reference)")
    for name, default in sizes.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return p.parse_args(argv)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train(name: str, make_model, batches, loss_fn, steps: int, device, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train a fresh model (seeded, so every run starts alike) for `steps` steps of AdamW; returns the
    losses, the step times (s) and the peak memory (bytes, CUDA only)."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(steps):
        inputs = batches(step)
        _sync(device)
        start = time.perf_counter()
        loss = loss_fn(model, *inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else 0
    return dict(name=name, losses=losses, times=times, peak=peak)


def report(example: str, runs: list[dict], out: str, device) -> str:
    """Writes <out>/<example>.csv (step, run, loss, step time) and .png (the loss curves), prints a
    summary, and returns the CSV's path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{example}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "loss", "step_ms", "peak_mib", "device"])
        for r in runs:
            for step, (loss, t) in enumerate(zip(r["losses"], r["times"])):
                w.writerow([r["name"], step, f"{loss:.6g}", f"{t * 1e3:.3f}", f"{r['peak'] / 2**20:.1f}", device])
    for r in runs:
        median = sorted(r["times"])[len(r["times"]) // 2] * 1e3
        print(f"{example} {r['name']:>12}: final loss {r['losses'][-1]:.5f}, median step {median:.2f} ms, "
              f"peak {r['peak'] / 2**20:.0f} MiB ({device})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(r["losses"], label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{example} ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{example}.png"), dpi=100)
    plt.close(fig)
    return path


def max_gap(runs: list[dict]) -> float:
    """The largest relative difference between the first run's loss curve and any other's."""
    first = runs[0]["losses"]
    return max(abs(a - b) / max(abs(a), 1e-12) for r in runs[1:] for a, b in zip(first, r["losses"]))

"""Sweep reporting: model cost (latency, parameters), results tables, and the accuracy-vs-cost plot."""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def model_cost(model: nn.Module, image_size: int, repeats: int = 5, threads: int = 1) -> dict[str, float]:
    """Parameter count and median single-image CPU latency (ms) of a model in eval mode.

    One thread and batch 1 is the serving case on a shared CPU; the median resists load spikes
    from other processes.
    """
    params = sum(p.numel() for p in model.parameters())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        x = torch.randn(1, 3, image_size, image_size)
        times = []
        with torch.no_grad():
            model(x)  # warm-up: first call allocates
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(old)
    return {"params": float(params), "latency_ms": statistics.median(times)}


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out_dir: Path,
                stem: str = "results") -> tuple[Path, Path]:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` (floats rounded in Markdown only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}")
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_accuracy_vs_cost(rows: Sequence[Mapping[str, Any]], out: Path, metric: str = "val_macro_f1",
                          label_key: str = "name") -> Path:
    """Two panels: accuracy against latency and against parameter count, one point per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, xlabel in ((axes[0], "latency_ms", "latency per image (ms, CPU, 1 thread)"),
                            (axes[1], "params", "parameters")):
        pts = [(r[key], r[metric], str(r.get(label_key, ""))) for r in rows
               if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
        for x, y, name in pts:
            ax.scatter(x, y)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if key == "params":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("sweep: accuracy against cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out.write_bytes(buf.getvalue())
    return out

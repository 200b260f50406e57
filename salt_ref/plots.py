r"""Figures people would rather look at than read: loss curves from ``metrics.jsonl`` and 2D sample panels.

Figures are saved with ``savefig``; matplotlib picks a non-interactive backend by itself on headless machines,
and importing this module does not change the backend (so notebooks keep showing figures inline).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from salt_ref.loop import read_metrics  # one reader of the log (it drops a line torn by a kill)

__all__ = ["read_metrics", "plot_losses", "scatter_panels"]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_losses(metrics_path: str | Path, out_png: str | Path, *, smooth: int = 10, title: str | None = None) -> Path:
    """One panel per ``loss_*`` column of ``metrics.jsonl`` against iteration (raw faint, smoothed solid).

    Each panel's y axis is labelled with its key (``metrics.schema.json`` beside the log says what it means);
    ``title`` names the run (default: the log's folder).
    """
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    if not keys:
        raise ValueError(f"{metrics_path} has no loss columns")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["iter"], r[key]) for r in rows if key in r]
        it, val = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
        ax.plot(it, val, alpha=0.3, lw=0.8, label="logged")
        ax.plot(it, _smooth(val, smooth), lw=1.5, label=f"mean of last {smooth}" if smooth > 1 else "logged")
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key + (" (log scale)" if np.all(val > 0) else ""))
        if np.all(val > 0):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or str(Path(metrics_path).parent), fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def scatter_panels(
    panels: Mapping[str, np.ndarray], out_png: str | Path, *, lim: float | None = None, title: str | None = None
) -> Path:
    """Side-by-side 2D scatters, one per named ``[N, 2]`` array, on shared axes."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), squeeze=False)
    arrays = {k: np.asarray(v) for k, v in panels.items()}
    if lim is None:
        lim = 1.15 * max(float(np.quantile(np.abs(a), 0.99)) for a in arrays.values())
    for ax, (name, pts) in zip(axes[0], arrays.items(), strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, lw=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)

"""Figures of the Concepts page, drawn from the library itself (exact flows, the real step lists and masks).

python docs/scripts/concepts_figures.py          # writes docs/assets/concepts_*.png (a few seconds on a CPU)
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from salt_ref.kv_cache import MemoryPolicy, frame_mask  # noqa: E402
from salt_ref.sc_dmd import coarse_boundaries  # noqa: E402
from salt_ref.schedule import denoising_sigmas, warp  # noqa: E402
from toy.gmm import ring8  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets"
BLUE, ORANGE, GREEN, GREY, RED = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728"


def schedule_figure() -> None:
    """The shift warp and the few-step lists it produces."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.5]})
    u = torch.linspace(0, 1, 201)
    for s, c in [(1.0, GREY), (3.0, GREEN), (5.0, BLUE)]:
        ax0.plot(u, warp(u, s), color=c, label=f"shift {s:g}")
    ax0.set(xlabel=r"raw level $\sigma$", ylabel=r"warp$(\sigma; s)$", title="the shift warp", aspect="equal")
    ax0.legend(frameon=False)
    rows = [(8, 5.0), (4, 5.0), (2, 5.0), (4, 1.0)]
    for i, (n, s) in enumerate(rows):
        sig = denoising_sigmas(n, s)
        ax1.plot(sig, [i] * len(sig), "o-", color=BLUE if s == 5.0 else GREY, ms=6)
        ax1.text(1.04, i, f"{n} steps, shift {s:g}", va="center", fontsize=9)
    fine = denoising_sigmas(8, 5.0)
    for b in coarse_boundaries(fine):
        ax1.axvline(b, color=ORANGE, lw=0.8, ls=":", zorder=0)
    ax1.set(xlim=(-0.03, 1.35), ylim=(-0.6, len(rows) - 0.4), yticks=[], xlabel=r"noise level $\sigma$ (1 = noise)")
    ax1.set_xticks([0, 0.25, 0.5, 0.625, 0.8333, 0.9375, 1])
    ax1.set_xticklabels(["0", ".25", ".5", ".625", ".833", "", "1"], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_title("few-step lists (dotted: the 4-step grid = the coarse boundaries of the 8-step list)", fontsize=9)
    for a in (ax0, ax1):
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(OUT / "concepts_schedule.png", dpi=130)
    plt.close(fig)


def composition_figure() -> None:
    """One DDIM jump vs two, with the exact denoiser: equal for a point mass, different for the ring."""
    target = ring8()
    gen = torch.Generator().manual_seed(3)
    s, m, e = 0.8, 0.4, 0.0
    x0 = target.sample(6, generator=gen)
    x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, name in zip(
        axes, ["point mass at (1, 0.5): all three coincide", "8-mode ring (std 0.1): they do not"], strict=True
    ):
        if name.startswith("point"):
            mu = torch.tensor([1.0, 0.5])

            def flow(x: torch.Tensor, sigma: float, mu: torch.Tensor = mu) -> torch.Tensor:
                return (x - mu) / sigma  # eps_hat - x0_hat with x0_hat = mu

            ax.scatter(*mu, s=120, marker="*", color="k", zorder=5, label="data")
        else:

            def flow(x: torch.Tensor, sigma: float) -> torch.Tensor:
                return target.flow(x, torch.full((x.shape[0],), max(sigma, 1e-4)))

            ref = target.sample(2000, generator=torch.Generator().manual_seed(0))
            ax.scatter(ref[:, 0], ref[:, 1], s=2, color="k", alpha=0.25, label="data")
        # the exact path (many small steps), one jump s -> e, two jumps s -> m -> e
        grid = torch.linspace(s, e, 401)
        path = [x_s]
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            path.append(path[-1] - (a - b) * flow(path[-1], float(a)))
        path = torch.stack(path)
        one = x_s - (s - e) * flow(x_s, s)
        x_m = x_s - (s - m) * flow(x_s, s)
        two = x_m - (m - e) * flow(x_m, m)
        for j in range(x_s.shape[0]):
            ax.plot(
                path[:, j, 0], path[:, j, 1], color=GREY, lw=1, zorder=1, label="exact ODE path" if j == 0 else None
            )
            ax.plot([x_s[j, 0], one[j, 0]], [x_s[j, 1], one[j, 1]], "--", color=BLUE, lw=1.2, zorder=2)
            ax.plot([x_s[j, 0], x_m[j, 0], two[j, 0]], [x_s[j, 1], x_m[j, 1], two[j, 1]], "-", color=ORANGE, lw=1.2)
        ax.scatter(x_s[:, 0], x_s[:, 1], s=30, color=GREEN, zorder=4, label=rf"$x_s$ at $\sigma_s={s}$")
        ax.scatter(
            one[:, 0],
            one[:, 1],
            s=40,
            facecolors="none",
            edgecolors=BLUE,
            lw=1.5,
            zorder=4,
            label=rf"one jump ${s}\to{e:g}$",
        )
        ax.scatter(
            two[:, 0],
            two[:, 1],
            s=40,
            marker="x",
            color=ORANGE,
            lw=1.5,
            zorder=4,
            label=rf"two jumps ${s}\to{m}\to{e:g}$",
        )
        ax.set(title=name, aspect="equal", xticks=[], yticks=[])
        ax.set_xlim(-2.9, 2.9)
        ax.set_ylim(-2.9, 2.9)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    fig.suptitle("DDIM with the exact denoiser: one jump vs two composed jumps", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT / "concepts_composition.png", dpi=130)
    plt.close(fig)


def masks_figure() -> None:
    """Which key frames each query frame sees under the three memory policies."""
    frames, chunk = 12, 2
    bounds = [(i, min(i + chunk, frames)) for i in range(0, frames, chunk)]
    policies = [
        ("full", MemoryPolicy("full")),
        ("window(4)", MemoryPolicy("window", window=4)),
        ("sink(2) + window(4)", MemoryPolicy("sink", window=4, sink=2)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.0), layout="constrained")
    for ax, (name, pol) in zip(axes, policies, strict=True):
        mask = frame_mask(bounds, pol).float()
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
        for b, _ in bounds[1:]:
            ax.axhline(b - 0.5, color="w", lw=1)
        ax.set(title=name, xlabel="key frame", ylabel="query frame" if name == "full" else None)
        ax.set_xticks(range(0, frames, 2))
        ax.set_yticks(range(0, frames, 2))
    fig.suptitle(
        f"block-causal frame masks: {frames} frames in chunks of {chunk} (salt_ref.kv_cache.frame_mask)", fontsize=10
    )
    fig.savefig(OUT / "concepts_masks.png", dpi=130)
    plt.close(fig)


def _box(ax, xy, w, h, text, color, fs=9):
    ax.add_patch(
        FancyBboxPatch(xy, w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="k", lw=0.8, alpha=0.9)
    )
    ax.text(xy[0] + w / 2, xy[1] + h / 2, text, ha="center", va="center", fontsize=fs)


def _arrow(ax, a, b, color="k", ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=color, lw=1, ls=ls))


def cache_figure() -> None:
    """The LQ and HQ caches of cache-aware training, and where the alignment loss looks."""
    fig, ax = plt.subplots(figsize=(10, 3.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4.1)
    ax.axis("off")
    lq, hq = "#cfe2f3", "#fde2c4"
    for c in range(3):
        x = 0.3 + 2.3 * c
        _box(ax, (x, 2.6), 1.7, 0.8, f"chunk {c + 1}\n2-step rollout\n(exit step with grad)", lq)
        _box(ax, (x, 0.7), 1.7, 0.8, f"chunk {c + 1}\n4-step reference\n(no grad)", hq)
        if c < 2:
            _arrow(ax, (x + 1.7, 3.0), (x + 2.3, 3.0), BLUE)
            _arrow(ax, (x + 1.7, 1.1), (x + 2.3, 1.1), ORANGE)
            ax.text(x + 2.0, 3.15, "LQ cache", ha="center", fontsize=8, color=BLUE)
            ax.text(x + 2.0, 1.25, "HQ cache", ha="center", fontsize=8, color=ORANGE)
        ax.text(x + 0.85, 2.05, r"same $\epsilon_c$", ha="center", fontsize=8, color=GREY)
        _arrow(ax, (x + 0.85, 2.55), (x + 0.85, 2.25), GREY, ls=":")
        _arrow(ax, (x + 0.85, 1.55), (x + 0.85, 1.85), GREY, ls=":")
    _arrow(ax, (6.3, 3.0), (7.05, 2.35))
    _arrow(ax, (6.3, 1.1), (7.05, 1.75))
    ax.text(7.15, 2.75, r"$x_0$ (all chunks)", fontsize=10)
    ax.text(7.15, 1.2, r"$x_0^{\rm ref}$ (all chunks)", fontsize=10)
    _box(
        ax,
        (7.1, 1.55),
        2.7,
        1.0,
        "frozen teacher, block 20\n(same small noise on both)\n" + r"per frame: $G = ZZ^\top$",
        "#e6e6e6",
    )
    ax.text(
        8.45,
        0.6,
        r"$\mathcal{L}_{\rm align} = \mathrm{mean}\,\mathrm{relu}(|G - G^{\rm ref}| - 0.1)$",
        ha="center",
        fontsize=10,
    )
    ax.text(0.3, 3.75, "student (what inference sees: its own few-step outputs in the cache)", fontsize=9, color=BLUE)
    ax.text(0.3, 0.3, "reference path (same student, better cache)", fontsize=9, color=ORANGE)
    fig.tight_layout()
    fig.savefig(OUT / "concepts_cache.png", dpi=130)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    schedule_figure()
    composition_figure()
    masks_figure()
    cache_figure()
    print("wrote", *sorted(p.name for p in OUT.glob("concepts_*.png")))
    assert math.isclose(float(denoising_sigmas(4, 5.0)[1]), 0.9375, rel_tol=1e-6)


if __name__ == "__main__":
    main()

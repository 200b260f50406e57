"""The video benchmark: methods x memory policy x horizon x metrics over seeds, drift curves, the LQ/HQ cache gap,
and the speed of generation.

    python -m toy.bench_video [--methods self-forcing sc-dmd salt] [--seeds 0 1 2] [--iters 150]
                              [--out runs/bench_video]

Every (method, seed) trains one student through ``toy.setup_video.run`` (full KV cache during training; the
teacher and the ODE init are shared and cached). Each trained EMA student is then generated under the memory
policies ``full``, ``window:4`` and ``sink:2+window:4`` (window-relative RoPE for the bounded ones) at 1x, 2x and
4x the trained length. Writes ``table.md``, ``results.json``, ``drift.png`` and ``speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MEMORIES = ("full", "window:4", "sink:2+window:4")
METRICS = (("fidelity", "fidelity ↓"), ("motion", "motion ↓"), ("class_acc", "class acc ↑"), ("frechet", "Fréchet ↓"))


def _one(args: tuple[str, int, int, str, dict]) -> dict[str, Any]:
    import torch

    from salt_ref.loop import LoopConfig
    from toy.setup_video import SmallVideoConfig, cache_quality_gap, evaluate_student, load_run, run

    method, seed, iters, out, overrides = args
    torch.set_num_threads(1)
    cfg = SmallVideoConfig(method=method, seed=seed, **overrides)
    loop = LoopConfig(
        iters=iters,
        critic_ratio=5,
        lr_gen=1e-4,
        lr_critic=2e-4,
        ema_start=min(50, iters // 4),
        ckpt_every=max(1, iters),
        log_every=1,
        seed=seed,
    )
    run_dir = Path(out) / f"{method}-s{seed}"
    run(cfg, loop, run_dir, progress=False)
    student, cfg, _ = load_run(run_dir)
    res: dict[str, Any] = {"memory": {}}
    for memory in MEMORIES:
        rope = "absolute" if memory == "full" else "relative"
        metrics, _, drift = evaluate_student(student, cfg, memory=memory, rope=rope)
        res["memory"][memory] = {"metrics": metrics, "drift": drift.tolist()}
    res["gap"] = cache_quality_gap(student, cfg)
    return res


def speed(out: Path, overrides: dict) -> str:
    """Per-chunk generation time over a long rollout, and the cache's speed-up over recomputing the prefix."""
    import torch

    from salt_ref.models.wan import WanModel
    from salt_ref.sample import generate, generate_without_cache
    from toy.setup_video import SmallVideoConfig, model_config

    torch.set_num_threads(1)
    cfg = SmallVideoConfig(**overrides)
    model = WanModel(model_config(cfg, causal=True)).eval()
    ctx = torch.randn(1, model.config.text_len, model.config.text_dim)
    lines = ["| memory | first 4 chunks (s/chunk) | last 4 chunks (s/chunk) |", "|---|---:|---:|"]
    for memory in MEMORIES:
        _, sec = generate(
            model,
            ctx,
            frames=32 * cfg.chunk_frames,
            size=(cfg.size, cfg.size),
            memory=memory,
            rope="relative",
            return_times=True,
            generator=torch.Generator().manual_seed(0),
        )
        lines.append(f"| {memory} | {np.mean(sec[:4]):.4f} | {np.mean(sec[-4:]):.4f} |")
    frames = 8 * cfg.chunk_frames
    t0 = time.perf_counter()
    generate(model, ctx, frames=frames, size=(cfg.size, cfg.size), generator=torch.Generator().manual_seed(0))
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate_without_cache(
        model, ctx, frames=frames, size=(cfg.size, cfg.size), generator=torch.Generator().manual_seed(0)
    )
    recompute = time.perf_counter() - t0
    lines += [
        "",
        f"8 chunks ({frames} frames): cached {cached:.2f} s, recomputing the prefix {recompute:.2f} s, "
        f"speed-up {recompute / cached:.2f}x",
    ]
    return "\n".join(lines)


def make_table(results: dict[str, list[dict]]) -> str:
    head = "| method | memory | horizon | " + " | ".join(m[1] for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for method, per_seed in results.items():
        for memory in MEMORIES:
            for h in ("1x", "2x", "4x"):
                cells = []
                for key, _ in METRICS:
                    vals = np.array([r["memory"][memory]["metrics"][h][key] for r in per_seed])
                    cells.append(f"{vals.mean():.3f} ± {vals.std():.3f}")
                lines.append(f"| {method} | {memory} | {h} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | LQ fidelity | HQ fidelity | gap (LQ - HQ) fidelity | gap motion |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, per_seed in results.items():
        g = {k: np.array([r["gap"][k] for r in per_seed]) for k in per_seed[0]["gap"]}
        lines.append(
            f"| {method} | {g['lq_fidelity'].mean():.4f} | {g['hq_fidelity'].mean():.4f} | "
            f"{g['gap_fidelity'].mean():.4f} ± {g['gap_fidelity'].std():.4f} | "
            f"{g['gap_motion'].mean():.4f} ± {g['gap_motion'].std():.4f} |"
        )
    return "\n".join(lines)


def plot_drift(results: dict[str, list[dict]], out_png: Path, trained: int) -> None:
    from salt_ref.plots import plt

    fig, axes = plt.subplots(1, len(MEMORIES), figsize=(4 * len(MEMORIES), 3), sharey=True)
    for ax, memory in zip(axes, MEMORIES, strict=True):
        for method, per_seed in results.items():
            curves = np.array([r["memory"][memory]["drift"] for r in per_seed])
            ax.plot(curves.mean(0), label=method)
        ax.axvline(trained - 0.5, ls="--", c="gray")
        ax.set_title(memory)
        ax.set_xlabel("frame")
    axes[0].set_ylabel("fidelity (re-render MSE)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.bench_video", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["self-forcing", "sc-dmd", "salt"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--out", default="runs/bench_video")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds, not results)")
    args = p.parse_args(argv)
    overrides = (
        dict(frames=4, size=8, dim=32, layers=2, heads=2, teacher_iters=2, ode_iters=2, ode_pairs=8, align_block=1)
        if args.tiny
        else {}
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the first run trains and caches the teacher and the init; the others then reuse them
    jobs = [(m, s, args.iters, str(out), overrides) for m in args.methods for s in args.seeds]
    first = _one(jobs[0])
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rest = list(pool.map(_one, jobs[1:]))
    results: dict[str, list[dict]] = {}
    for (m, _, _, _, _), r in zip(jobs, [first, *rest], strict=True):
        results.setdefault(m, []).append(r)
    table = make_table(results)
    cmd = "python -m toy.bench_video " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    header = (
        f"`{cmd.strip()}` — seeds {args.seeds}, {args.iters} iterations, {(time.perf_counter() - t0) / 60:.1f} min\n\n"
    )
    (out / "table.md").write_text(header + table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    trained = 4 if args.tiny else 8
    plot_drift(results, out / "drift.png", trained)
    speed_md = speed(out, overrides)
    (out / "speed.md").write_text(speed_md + "\n")
    print(header + table + "\n\n" + speed_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

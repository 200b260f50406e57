"""The video benchmark: methods x memory policy x horizon x metrics over seeds, drift curves, the LQ/HQ cache gap,
and the speed of generation.

    python -m toy.bench_video [--methods self-forcing sc-dmd salt] [--seeds 0 1 2] [--iters 150]
                              [--out runs/bench_video] [--steps 4]

Every (method, seed) trains one student through ``toy.run_video.run`` (full KV cache during training; the
teacher and the ODE init are shared and cached). Each trained EMA student is then generated under the memory
policies ``full``, ``window:4`` and ``sink:2+window:4`` (window-relative RoPE for the bounded ones) at 1x, 2x and
4x the trained length, and its LQ/HQ cache gap is measured at 1x and 4x (``toy.run_video.cache_quality_gap``).
An ``ode-init`` row evaluates the student before distillation. A run directory that already holds a checkpoint is
resumed, so a killed benchmark continues where it stopped and a finished one is only re-evaluated. Writes
``table.md``, ``results.json``, ``drift.png``, ``speed.md`` and ``speed.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

MEMORIES = ("full", "window:4", "sink:2+window:4")  # table labels; parsed once into MemoryPolicy where used
BASELINE = "ode-init"  # the row of the student before distillation (deterministic: evaluated on the first seed)
METRICS = (("fidelity", "fidelity ↓"), ("motion", "motion ↓"), ("class_acc", "class acc ↑"), ("frechet", "Fréchet ↓"))


def _one(args: tuple[str, int, int, str, dict, int]) -> dict[str, Any]:
    import torch

    from salt_ref.kv_cache import MemoryPolicy
    from salt_ref.plots import read_metrics
    from toy.run_video import cache_quality_gap, evaluate_student, load_run, run
    from toy.setup_video import SmallVideoConfig, distill_loop

    method, seed, iters, out, overrides, steps = args
    torch.set_num_threads(1)
    if method == BASELINE:  # the ODE-regression init itself: zero distillation iterations
        cfg, iters = SmallVideoConfig(method="self-forcing", seed=seed, **overrides), 0
    else:
        cfg = SmallVideoConfig(method=method, seed=seed, **overrides)
    loop = distill_loop(iters, seed)
    run_dir = Path(out) / f"{method}-s{seed}"
    # a run with a checkpoint is continued (a killed benchmark loses nothing; a finished run is only re-evaluated)
    run(cfg, loop, run_dir, progress=False, resume=(run_dir / "checkpoint.safetensors").exists())
    student, cfg, _ = load_run(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    res: dict[str, Any] = {"memory": {}, "train_s": rows[-1]["time_s"] if rows else 0.0}
    for memory in MEMORIES:
        rope = "absolute" if memory == "full" else "relative"
        metrics, _, drift = evaluate_student(student, cfg, memory=MemoryPolicy.parse(memory), rope=rope, steps=steps)
        res["memory"][memory] = {"metrics": metrics, "drift": drift.tolist()}
    res["gap"] = {f"{h}x": cache_quality_gap(student, cfg, frames=h * cfg.frames) for h in (1, 4)}
    return res


def speed(out: Path, overrides: dict, repeats: int = 5) -> str:
    """Per-chunk generation time over a 32-chunk rollout (``speed.png``), and the cache's speed-up over recomputing
    the prefix at 8 chunks. Every time is the median of ``repeats`` runs (one thread)."""
    import torch

    from salt_ref.generate import generate, generate_without_cache
    from salt_ref.kv_cache import MemoryPolicy
    from salt_ref.models.wan import WanModel
    from salt_ref.plots import plt
    from toy.setup_video import SmallVideoConfig, model_config

    torch.set_num_threads(1)
    cfg = SmallVideoConfig(**overrides)
    model = WanModel(model_config(cfg, causal=True)).eval()
    ctx = torch.randn(1, model.config.text_len, model.config.text_dim)
    size = (cfg.size, cfg.size)

    def seconds(fn, **kw) -> float:
        t0 = time.perf_counter()
        fn(model, ctx, size=size, recipe=cfg.recipe, generator=torch.Generator().manual_seed(0), **kw)
        return time.perf_counter() - t0

    lines = ["| memory | chunks 1-4 (s/chunk) | chunks 29-32 (s/chunk) | last / first |", "|---|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(5, 3))
    for memory in MEMORIES:
        runs = [
            generate(
                model,
                ctx,
                frames=32 * cfg.chunk_frames,
                size=size,
                recipe=cfg.recipe,
                memory=MemoryPolicy.parse(memory),
                rope="relative",
                return_times=True,
                generator=torch.Generator().manual_seed(0),
            )[1]
            for _ in range(repeats)
        ]
        sec = np.median(np.array(runs), axis=0)
        first, last = sec[:4].mean(), sec[-4:].mean()
        lines.append(f"| {memory} | {first:.4f} | {last:.4f} | {last / first:.2f} |")
        ax.plot(np.arange(1, len(sec) + 1), 1000 * sec, label=memory)
    ax.set_xlabel("chunk")
    ax.set_ylabel(f"ms per chunk (median of {repeats})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=110)
    plt.close(fig)
    frames = 8 * cfg.chunk_frames
    cached = float(np.median([seconds(generate, frames=frames) for _ in range(repeats)]))
    recompute = float(np.median([seconds(generate_without_cache, frames=frames) for _ in range(repeats)]))
    lines += [
        "",
        f"8 chunks ({frames} frames, 4 steps): cached {cached:.3f} s, recomputing the prefix {recompute:.3f} s, "
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
        "| method | length | LQ-cache fidelity | HQ-cache fidelity | gap (LQ - HQ) |",
        "|---|---|---:|---:|---:|",
    ]
    for method, per_seed in results.items():
        for h in per_seed[0]["gap"]:
            g = {k: np.array([r["gap"][h][k] for r in per_seed]) for k in per_seed[0]["gap"][h]}
            lines.append(
                f"| {method} | {h} | {g['lq_fidelity'].mean():.4f} | {g['hq_fidelity'].mean():.4f} | "
                f"{g['gap_fidelity'].mean():+.4f} ± {g['gap_fidelity'].std():.4f} |"
            )
    return "\n".join(lines)


def plot_drift(results: dict[str, list[dict]], out_png: Path, trained: int) -> None:
    from salt_ref.plots import plt

    fig, axes = plt.subplots(1, len(MEMORIES), figsize=(4 * len(MEMORIES), 3), sharey=True)
    for ax, memory in zip(axes, MEMORIES, strict=True):
        for method, per_seed in results.items():
            curves = np.array([r["memory"][memory]["drift"] for r in per_seed])
            style = dict(ls="--", c="gray") if method == BASELINE else {}
            ax.plot(curves.mean(0), label=method, **style)
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
    p.add_argument("--no-baseline", action="store_true", help=f"no {BASELINE!r} row (the student before distillation)")
    p.add_argument(
        "--steps",
        type=int,
        default=4,
        help="sampling steps of the evaluation; other than 4, the files get a suffix (table_2step.md, ...)",
    )
    args = p.parse_args(argv)
    overrides = (
        dict(frames=4, size=8, dim=32, layers=2, heads=2, teacher_iters=2, ode_iters=2, ode_pairs=8)
        if args.tiny
        else {}
    )
    if args.tiny:  # the tiny model has 2 blocks: align at the first
        from salt_ref.recipe import PRESETS

        overrides["recipe"] = PRESETS["small"].replace(align_block=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # teacher and init are trained (or found) once, here, with every core; the runs then only read them
    import torch

    from toy.setup_video import CACHE_DIR, SmallVideoConfig, get_student_init, get_teacher

    torch.set_num_threads(max(1, args.workers))
    shared = SmallVideoConfig(**overrides)
    get_student_init(shared, get_teacher(shared, CACHE_DIR, progress=False), CACHE_DIR, progress=False)
    jobs = [(m, s, args.iters, str(out), overrides, args.steps) for m in args.methods for s in args.seeds]
    if not args.no_baseline:
        jobs.append((BASELINE, args.seeds[0], 0, str(out), overrides, args.steps))
    # spawn, not fork: the parent's OpenMP pool (it trained above) must not be inherited by the workers
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(_one, jobs))
    results: dict[str, list[dict]] = {}
    for (m, *_), r in zip(jobs, runs, strict=True):
        results.setdefault(m, []).append(r)
    table = make_table(results)
    cmd = "python -m toy.bench_video " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    train_min = sum(r["train_s"] for per_seed in results.values() for r in per_seed) / 60
    header = (
        f"`{cmd.strip()}` — seeds {args.seeds}, {args.iters} iterations, {args.steps}-step sampling; training "
        f"{train_min:.1f} min summed over runs (metrics.jsonl), this invocation {(time.perf_counter() - t0) / 60:.1f}"
        " min wall\n\n"
    )
    sfx = "" if args.steps == 4 else f"_{args.steps}step"
    (out / f"table{sfx}.md").write_text(header + table + "\n")
    (out / f"results{sfx}.json").write_text(json.dumps(results, indent=1))
    trained = 4 if args.tiny else 8
    plot_drift(results, out / f"drift{sfx}.png", trained)
    if sfx:
        print(header + table)
        return 0
    speed_md = speed(out, overrides)
    (out / "speed.md").write_text(speed_md + "\n")
    print(header + table + "\n\n" + speed_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The video benchmark: methods x memory policy x horizon x metrics over seeds, drift curves, the LQ/HQ cache gap,
and the speed of generation.

    python -m toy.bench_video [--methods self-forcing sc-dmd salt] [--seeds 0 1 2] [--iters 150]
                              [--out runs/bench_video] [--steps 4] [--cfg-scale 2] [--teacher-iters 3000]
                              [--teacher network|exact]

Every (method, seed) trains one student through ``toy.run_video.run`` (full KV cache during training; the
teacher and the ODE init are shared and cached). Each trained EMA student is then generated under the memory
policies ``full``, ``window:4`` and ``sink:2+window:4`` (window-relative RoPE for the bounded ones) at 1x, 2x and
4x the trained length, and its LQ/HQ cache gap (tint drift and fidelity, ``toy.run_video.cache_quality_gap``) is
measured under each policy at 1x and 4x. The students' look (speed, radius, bounces, wall-sticking) is set next to
the world's own, and Salt's alignment term is probed on fixed draws (``toy.run_video.alignment_probe``).
An ``ode-init`` row evaluates the student before distillation. A run directory that already holds a checkpoint is
resumed, so a killed benchmark continues where it stopped and a finished one is only re-evaluated. Writes
``table.md`` (metrics, cache gap, look, alignment), ``results.json``, ``drift.png``, ``samples.png`` (frames of
each method and memory policy, 4x nearest-neighbour), ``speed.md`` and ``speed.png`` into ``--out``; the site
shows copies under ``docs/assets/bench_video_*`` and ``docs/assets/video_samples.png``.
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
METRICS = (
    ("fidelity", "fidelity ↓"),
    ("motion", "motion ↓"),
    ("class_acc", "class acc ↑"),
    ("frechet", "Fréchet ↓"),
    ("appearance", "tint drift ↓"),
)
LOOK = ("speed", "radius", "bounces", "stuck")  # physics_stats, set next to the world's own (world_*)
SAMPLE_CLIPS = [0, 8]  # clips of the evaluation shown in the frame grid (classes 0 and 2, 4 clips per class)


def _one(args: tuple[str, int, int, str, dict, int]) -> dict[str, Any]:
    import torch

    from salt_ref.kv_cache import MemoryPolicy
    from salt_ref.plots import read_metrics
    from toy.run_video import alignment_probe, cache_quality_gap, evaluate_student, load_run, run
    from toy.setup_video import CACHE_DIR, SmallVideoConfig, distill_loop, get_teacher

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
    res: dict[str, Any] = {"memory": {}, "train_s": rows[-1]["time_s"] if rows else 0.0, "samples": {}, "gap": {}}
    for memory in MEMORIES:
        rope = "absolute" if memory == "full" else "relative"
        policy = MemoryPolicy.parse(memory)
        metrics, videos, drift = evaluate_student(student, cfg, memory=policy, rope=rope, steps=steps)
        res["memory"][memory] = {"metrics": metrics, "drift": drift.tolist()}
        res["samples"][memory] = videos[max(videos)][SAMPLE_CLIPS].clone()  # for the frame grid (not in the JSON)
        res["gap"][memory] = {
            f"{h}x": cache_quality_gap(student, cfg, frames=h * cfg.frames, memory=policy, rope=rope) for h in (1, 4)
        }
    # the alignment term on fixed draws, and how the logged loss_align moved during training (see docs/results.md)
    res["align_probe"] = alignment_probe(student, get_teacher(cfg, CACHE_DIR, progress=False), cfg)
    logged = [row["loss_align"] for row in rows if "loss_align" in row]
    if len(logged) >= 10:
        k = max(1, len(logged) // 5)
        res["align_logged"] = {"first": float(np.mean(logged[:k])), "last": float(np.mean(logged[-k:]))}
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
    return "\n".join(lines)


def _ms(vals: np.ndarray, fmt: str = ".4f") -> str:
    return f"{vals.mean():{fmt}} ± {vals.std():{fmt.lstrip('+')}}"


def gap_table(results: dict[str, list[dict]]) -> str:
    """LQ- against HQ-cache generations per method, memory policy and length: tint drift and fidelity, the gaps
    (mean ± spread over seeds, the spread being the std of the per-seed gaps) and gap / spread."""
    lines = [
        "| method | memory | length | LQ-cache tint drift | HQ-cache tint drift | tint gap (LQ - HQ) | gap / spread "
        "| fidelity gap (LQ - HQ) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, per_seed in results.items():
        for memory in MEMORIES:
            for h in ("1x", "4x"):
                g = {k: np.array([r["gap"][memory][h][k] for r in per_seed]) for k in per_seed[0]["gap"][memory][h]}
                gap = g["gap_appearance"]
                ratio = f"{gap.mean() / gap.std():.1f}" if len(gap) > 1 and gap.std() > 0 else "–"
                lines.append(
                    f"| {method} | {memory} | {h} | {g['lq_appearance'].mean():.4f} | {g['hq_appearance'].mean():.4f} "
                    f"| {_ms(gap, '+.4f')} | {ratio} | {_ms(g['gap_fidelity'], '+.4f')} |"
                )
    return "\n".join(lines)


def look_table(results: dict[str, list[dict]], memory: str = "full") -> str:
    """Speed, radius, bounces and wall-sticking of the students' videos next to the world's clips' (same fits)."""
    lines = [
        "| method | horizon | speed px/frame | radius px | bounces / 10 frames | stuck at wall |",
        "|---|---|---:|---:|---:|---:|",
    ]
    first = next(iter(results.values()))[0]["memory"][memory]["metrics"]
    for h in ("1x", "4x"):
        world = "| world | " + h + " | " + " | ".join(f"{first[h]['world_' + k]:.3f}" for k in LOOK) + " |"
        lines.append(world)
        for method, per_seed in results.items():
            cells = [_ms(np.array([r["memory"][memory]["metrics"][h][k] for r in per_seed]), ".3f") for k in LOOK]
            lines.append(f"| {method} | {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def align_table(results: dict[str, list[dict]]) -> str:
    """Salt's alignment term on fixed draws (``toy.run_video.alignment_probe``) per student, its floor (the reference
    path on the student's own 2-step grid with the student's own draws: 0 when the paths share their random
    numbers), and the logged ``loss_align`` over the first and last fifth of training (where the method logs it)."""
    lines = [
        "| student | probe loss_align | floor (same grid) | Gram entries over the margin | LQ-HQ output MSE "
        "| floor MSE | logged loss_align, first fifth -> last fifth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, per_seed in results.items():
        p = {k: np.array([r["align_probe"][k] for r in per_seed]) for k in per_seed[0]["align_probe"]}
        logged = [r["align_logged"] for r in per_seed if "align_logged" in r]
        trend = (
            f"{np.mean([x['first'] for x in logged]):.4f} -> {np.mean([x['last'] for x in logged]):.4f}"
            if logged
            else "–"
        )
        lines.append(
            f"| {method} | {_ms(p['loss_align'])} | {_ms(p['loss_align_floor'])} | {_ms(p['frac_over'], '.3f')} "
            f"| {_ms(p['ref_mse'])} | {_ms(p['ref_mse_floor'])} | {trend} |"
        )
    return "\n".join(lines)


def plot_samples(results: dict[str, list[dict]], out_png: Path, world_clips, frames: int = 16, scale: int = 4) -> None:
    """One row per (method, memory, clip), one column per frame (every other frame of the 4x videos), upscaled
    ``scale`` times by nearest neighbour, first seed; the world's clips of the same classes on top."""
    import torch

    from salt_ref.plots import plt

    rows, names = [world_clips], ["world"]
    for method, per_seed in results.items():
        for memory in MEMORIES:
            rows.append(per_seed[0]["samples"][memory])
            names.append(f"{method}, {memory}")
    stride = max(1, rows[1].shape[2] // frames)
    tiles = []
    for video in rows:  # [K, 3, F, S, S]
        x = ((video[:, :, ::stride][:, :, :frames].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # nearest neighbour
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=255)
        tiles.append(torch.cat([torch.cat(list(clip.unbind(1)), dim=-1) for clip in x], dim=-2))  # [3, K*H, F*W]
    img = torch.cat(tiles, dim=-2).permute(1, 2, 0).numpy()
    h_row = tiles[0].shape[-2]
    fig = plt.figure(figsize=(img.shape[1] / 100 + 2.2, img.shape[0] / 100 + 0.4), dpi=100)
    ax = fig.add_axes(
        [
            2.2 / (img.shape[1] / 100 + 2.2),
            0.2 / (img.shape[0] / 100 + 0.4),
            1 - 2.2 / (img.shape[1] / 100 + 2.2),
            1 - 0.4 / (img.shape[0] / 100 + 0.4),
        ]
    )
    ax.imshow(img, interpolation="nearest")
    ax.set_yticks([h_row * (i + 0.5) for i in range(len(names))], names, fontsize=8)
    ax.set_xticks(
        [(i + 0.5) * img.shape[1] / frames for i in range(frames)], [str(i * stride) for i in range(frames)], fontsize=7
    )
    ax.set_xlabel("frame (4x the trained length; every other frame)", fontsize=8)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


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


def build_parser() -> argparse.ArgumentParser:
    from salt_ref.recipe import PRESETS
    from toy.setup_video import add_teacher_argument

    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph, not its first line
    p = argparse.ArgumentParser(prog="python -m toy.bench_video", description=summary)
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
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=PRESETS["small"].cfg_scale,
        help="the recipe's guidance: of the ODE init's teacher trajectories, DMD's real score and the samplers "
        "(the teacher itself is shared; use a new --out, a run trained under another scale is refused)",
    )
    p.add_argument(
        "--teacher-iters",
        type=int,
        default=None,
        help="flow-matching steps of the shared teacher (trained once, cached under its own key; default: the "
        "small setup's, or the tiny one's with --tiny)",
    )
    add_teacher_argument(p)
    return p


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SmallVideoConfig`` fields the parsed flags change (the recipe always: it carries ``--cfg-scale``)."""
    from salt_ref.recipe import PRESETS
    from toy.setup_video import SmallVideoConfig

    tiny = dict(frames=4, size=8, dim=32, layers=2, heads=2, teacher_iters=2, ode_iters=2, ode_pairs=8)
    overrides: dict[str, Any] = dict(tiny) if args.tiny else {}
    recipe = PRESETS["small"].replace(cfg_scale=args.cfg_scale)
    overrides["recipe"] = recipe.replace(align_block=1) if args.tiny else recipe  # tiny: 2 blocks, align at the first
    if args.teacher_iters is not None:
        overrides["teacher_iters"] = args.teacher_iters
    if args.teacher != SmallVideoConfig.teacher:
        overrides["teacher"] = args.teacher
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = overrides_of(args)
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
    table = "\n\n".join([make_table(results), gap_table(results), look_table(results), align_table(results)])
    cmd = "python -m toy.bench_video " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    train_min = sum(r["train_s"] for per_seed in results.values() for r in per_seed) / 60
    header = (
        f"`{cmd.strip()}` — seeds {args.seeds}, {args.iters} iterations, {args.steps}-step sampling, CFG "
        f"{args.cfg_scale:g}, {args.teacher} teacher; training "
        f"{train_min:.1f} min summed over runs (metrics.jsonl), this invocation {(time.perf_counter() - t0) / 60:.1f}"
        " min wall\n\n"
    )
    sfx = "" if args.steps == 4 else f"_{args.steps}step"
    (out / f"table{sfx}.md").write_text(header + table + "\n")
    samples = {m: [r.pop("samples") for r in per_seed] for m, per_seed in results.items()}
    (out / f"results{sfx}.json").write_text(json.dumps(results, indent=1))
    trained = 4 if args.tiny else 8
    plot_drift(results, out / f"drift{sfx}.png", trained)
    from toy import video_world as vw

    for m, per_seed in results.items():
        for r, smp in zip(per_seed, samples[m], strict=True):
            r["samples"] = smp
    world = shared.world_config()
    lab = torch.arange(world.n_classes).repeat_interleave(4)
    clips, _, _ = vw.sample(len(lab), torch.Generator().manual_seed(1235), config=world, frames=4 * trained, label=lab)
    plot_samples(results, out / f"samples{sfx}.png", clips[SAMPLE_CLIPS])
    if sfx:
        print(header + table)
        return 0
    speed_md = speed(out, overrides)
    (out / "speed.md").write_text(speed_md + "\n")
    print(header + table + "\n\n" + speed_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

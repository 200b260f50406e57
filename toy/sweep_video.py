"""What makes the video students slow and alike: a one-knob-at-a-time sweep of the small distillation.

    python -m toy.sweep_video [--method self-forcing] [--seeds 0] [--knobs shift cfg_scale ...]
                              [--out runs/sweep_video] [--workers 2] [--tiny] [--teacher network|exact]

From the fixed base :data:`BASE` (the small preset's recipe and loop, written out here so that re-running the
sweep reproduces its table), each knob of :data:`KNOBS` is moved to each of its other values with the rest held;
every setting trains one student per seed through :func:`toy.run_video.run` (cached teacher, the ODE init of its
own recipe and chunk length). A cell already in ``--out`` is read back (``final_metrics.json``), or evaluated again
when only its finished checkpoint is there; a killed one is continued. ``iters 0`` is the ODE init.

The table sets the students' look at 1x, 4-step sampling, full cache (``final_metrics.json`` of each run, 16
clips) next to the world's clips measured by the same fits:

    diversity     mean pairwise distance of (start / S, velocity) within a class (toy.video_metrics.diversity)
    speed         mean over clips of the median |c_{f+1} - c_f| (px/frame), c_f the fitted centre
    within/across the same median over the steps inside a chunk and into a new chunk (toy.video_metrics.chunk_steps)
    radius, bounces, fidelity, tint drift, Frechet       as in toy.bench_video
    grid TV       toy.video_metrics.patch_grid_tv at the network's patch size, on 64 more clips per run (16 per
                  class, seed 3): whether the discs snap to the token grid

Writes ``sweep.md`` and ``sweep.json`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from salt_ref.loop import LoopConfig
    from toy.setup_video import SmallVideoConfig

__all__ = ["BASE", "KNOBS", "COLUMNS", "settings", "cell_config", "main"]

# The sweep's centre: the small preset's distillation (recipe `small`, `distill_loop`, 2-frame chunks), spelled out.
BASE: dict[str, Any] = {"iters": 150, "shift": 5.0, "cfg_scale": 2.0, "lr_gen": 1e-4, "lr_critic": 2e-4,
                        "critic_ratio": 5, "beta1": 0.0, "dmd_normalizer": "sample", "dmd_sigma_min": 0.02,
                        "dmd_sigma_max": 0.98, "chunk_frames": 2, "patch": 4}  # fmt: skip
# knob -> (where it lives, values tried): the loop, the recipe, or the SmallVideoConfig
KNOBS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "iters": ("loop", (0, 50, 150)),
    "shift": ("recipe", (1.0, 5.0)),
    "cfg_scale": ("recipe", (0.0, 1.0, 2.0)),
    "lr_gen": ("loop", (3e-5, 1e-4)),
    "lr_critic": ("loop", (4e-5, 2e-4, 1e-3)),
    "critic_ratio": ("loop", (5, 10)),
    "beta1": ("loop", (0.0, 0.9)),
    "dmd_normalizer": ("recipe", ("sample", "batch")),
    "dmd_sigma_min": ("recipe", (0.02, 0.5)),  # DMD and the critic only on levels above 0.5
    "dmd_sigma_max": ("recipe", (0.5, 0.98)),  # ... only below 0.5
    "chunk_frames": ("cfg", (1, 2, 4, 8)),  # 8: one chunk, the whole clip at once (bidirectional)
    "patch": ("cfg", (2, 4)),  # 2: 4x the tokens, a teacher of its own (about 5x the time per iteration)
}
# (key of final_metrics.json, column header, format); the world's own value heads the column where it has one
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("diversity", "diversity ↑", ".3f"),
    ("speed", "speed px/frame", ".3f"),
    ("step_within", "step inside a chunk", ".3f"),
    ("step_across", "step into a chunk", ".3f"),
    ("radius", "radius px", ".3f"),
    ("bounces", "bounces / 10 frames", ".2f"),
    ("fidelity", "fidelity ↓", ".4f"),
    ("appearance", "tint drift ↓", ".3f"),
    ("frechet", "Fréchet ↓", ".2f"),
    ("grid_tv", "patch-grid TV ↓", ".3f"),
)
GRID_CLIPS = 16  # per class, for the patch-grid TV
TINY = dict(frames=4, size=8, dim=32, layers=2, heads=2, teacher_iters=2, ode_iters=2, ode_pairs=8)


def settings(knobs: list[str] | None = None) -> list[tuple[str, Any]]:
    """``[("base", None), (knob, value), ...]``: the base and every one-knob change from it (of ``knobs``)."""
    out: list[tuple[str, Any]] = [("base", None)]
    for knob, (_, values) in KNOBS.items():
        if knobs is None or knob in knobs:
            out += [(knob, v) for v in values if v != BASE[knob]]
    return out


def cell_config(
    knob: str, value: Any, seed: int, tiny: bool, teacher: str = "network"
) -> tuple[SmallVideoConfig, LoopConfig]:
    """The run of ``BASE`` with ``knob`` at ``value`` under ``teacher``: ``(SmallVideoConfig, LoopConfig)``."""
    from salt_ref.recipe import PRESETS
    from toy.setup_video import SmallVideoConfig, distill_loop

    s = dict(BASE) if knob == "base" else {**BASE, knob: value}
    recipe = PRESETS["small"].replace(**{k: s[k] for k, (where, _) in KNOBS.items() if where == "recipe"})
    extra = dict(TINY, recipe=recipe.replace(align_block=1)) if tiny else {"recipe": recipe}
    cfg = SmallVideoConfig(
        method="self-forcing", seed=seed, chunk_frames=s["chunk_frames"], patch=s["patch"], teacher=teacher, **extra
    )
    iters = round(s["iters"] / 50) if tiny else s["iters"]  # tiny: every budget / 50 (150 -> 3)
    loop = distill_loop(iters, seed, lr_gen=s["lr_gen"], lr_critic=s["lr_critic"], critic_ratio=s["critic_ratio"])
    return cfg, replace(loop, betas=(s["beta1"], loop.betas[1]))


def _name(knob: str, value: Any, seed: int) -> str:
    return f"{knob}-s{seed}" if knob == "base" else f"{knob}={value}-s{seed}"


def _one(job: tuple[str, Any, int, str, bool, str]) -> dict[str, Any]:
    import torch

    from salt_ref.checkpoint import read_header
    from toy.run_video import run

    knob, value, seed, out, tiny, teacher = job
    torch.set_num_threads(1)
    cfg, loop = cell_config(knob, value, seed, tiny, teacher)
    run_dir = Path(out) / _name(knob, value, seed)
    done, ckpt = run_dir / "final_metrics.json", run_dir / "checkpoint.safetensors"
    if done.exists():  # read back: a finished cell is not trained or evaluated again
        final = {**json.loads(done.read_text()), "how": "read back"}
    else:  # trained (or continued); a checkpoint already at the budget is only evaluated
        how = "evaluated" if ckpt.exists() and read_header(ckpt)["iteration"] >= loop.iters else "trained"
        final = {**run(cfg, loop, run_dir, progress=False, resume=ckpt.exists()), "how": how}
    final["metrics"]["1x"]["grid_tv"] = _grid_tv(run_dir)
    return final


def _grid_tv(run_dir: Path) -> float:
    """``patch_grid_tv`` of the run's EMA student on ``GRID_CLIPS`` clips per class (4-step, full cache)."""
    import torch

    from salt_ref.generate import generate
    from toy import video_metrics as vm
    from toy.run_video import load_run

    student, cfg, prompts = load_run(run_dir)
    labels = torch.arange(cfg.world_config().n_classes).repeat_interleave(GRID_CLIPS)
    with torch.no_grad():
        video = generate(student, prompts.embed(labels), frames=cfg.frames, size=(cfg.size, cfg.size),
                         recipe=cfg.recipe, generator=torch.Generator().manual_seed(3))  # fmt: skip
    return vm.patch_grid_tv(video, cfg.patch, config=cfg.world_config())


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):{fmt}}" + (f" ± {np.std(values):{fmt}}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    from toy.setup_video import add_teacher_argument

    p = argparse.ArgumentParser(
        prog="python -m toy.sweep_video",
        description="One-knob-at-a-time sweep of the small video distillation (self-forcing): the students' "
        "diversity, speed, chunk-wise motion and look next to the world's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per setting")
    p.add_argument("--knobs", nargs="+", choices=list(KNOBS), default=None, help="only these knobs (default: all)")
    p.add_argument("--out", default="runs/sweep_video", help="output folder (cells are resumed from it)")
    p.add_argument("--workers", type=int, default=2, help="cells trained at a time")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes and budgets (seconds, not results)")
    add_teacher_argument(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import torch
    from tqdm import tqdm

    from toy.setup_video import CACHE_DIR, get_student_init, get_teacher

    grid = settings(args.knobs)
    # the teacher and every distinct ODE init are trained (or found) here, once, before the workers read them
    torch.set_num_threads(max(1, args.workers))
    inits = {}
    for knob, value in grid:
        cfg, _ = cell_config(knob, value, args.seeds[0], args.tiny, args.teacher)
        inits.setdefault(cfg.init_key(), cfg)
    for cfg in inits.values():
        get_student_init(cfg, get_teacher(cfg, CACHE_DIR, progress=False), CACHE_DIR, progress=False)
    jobs = [(k, v, s, str(out), args.tiny, args.teacher) for k, v in grid for s in args.seeds]
    # spawn, not fork: the parent's OpenMP pool (it trained above) must not be inherited by the workers
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        finals = list(tqdm(pool.map(_one, jobs), total=len(jobs), desc="sweep_video cells", unit="run"))
    by_setting: dict[tuple[str, str], list[dict]] = {}
    for (k, v, *_), final in zip(jobs, finals, strict=True):
        by_setting.setdefault((k, str(v)), []).append(final["metrics"]["1x"])
    # the world's clips of the evaluation (toy.run_video.evaluate_student, 4 per class) through the same fits
    from toy import video_metrics as vm
    from toy import video_world as vw
    from toy.run_video import reference_clips

    base_cfg, _ = cell_config("base", None, args.seeds[0], args.tiny, args.teacher)
    wcfg = base_cfg.world_config()
    labels = torch.arange(wcfg.n_classes).repeat_interleave(4)
    clips = reference_clips(base_cfg, labels, base_cfg.frames)
    world = vm.evaluate_video(clips, labels, clips, config=wcfg, chunk_frames=base_cfg.chunk_frames)
    grid_labels = torch.arange(wcfg.n_classes).repeat_interleave(GRID_CLIPS)
    grid_clips, _, _ = vw.sample(len(grid_labels), torch.Generator().manual_seed(3), config=wcfg, label=grid_labels)
    world["grid_tv"] = vm.patch_grid_tv(grid_clips, base_cfg.patch, config=wcfg)
    rows = []
    for (k, v), per_seed in by_setting.items():
        rows.append({"knob": k, "value": v, **{c: [m[c] for m in per_seed if c in m] for c, _, _ in COLUMNS}})
    minutes = (time.perf_counter() - t0) / 60
    cmd = "python -m toy.sweep_video " + " ".join(argv if argv is not None else sys.argv[1:])
    how = {h: sum(f["how"] == h for f in finals) for h in ("trained", "evaluated", "read back")}
    lines = [
        f"`{cmd.strip()}` — self-forcing, {args.teacher} teacher, seeds {args.seeds}: {len(finals)} runs ("
        + ", ".join(f"{n} {h}" for h, n in how.items())
        + f" by this invocation; evaluated: from a finished checkpoint), {minutes:.1f} min wall; 1x, 4-step "
        "sampling, full cache",
        "",
        "| knob | value | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
        "| world | – | " + " | ".join(_cell([world[c]] if c in world else [], f) for c, _, f in COLUMNS) + " |",
    ]
    for r in rows:
        value = "base" if r["knob"] == "base" else r["value"]
        lines.append(f"| {r['knob']} | {value} | " + " | ".join(_cell(r[c], f) for c, _, f in COLUMNS) + " |")
    table = "\n".join(lines)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps({"command": cmd, "rows": rows, "minutes": minutes}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

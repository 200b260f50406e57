"""The 2D benchmark: {teacher, CD, DMD, SC-DMD} x {1, 2, 4} steps x metrics, over seeds (mean +- std).

    python -m toy.bench_2d [--target ring8] [--seeds 0 1 2] [--iters 600] [--out runs/bench_2d]

Every student method starts from the same teacher-initialised MLP for a given seed and trains for the same
number of generator iterations through the shared loop (DMD and SC-DMD: 5 critic updates each; CD: none).
The teacher row is the exact Gaussian-mixture flow sampled with n DDIM steps; students are sampled with the
re-noise sampler they were trained with, from the same starting noise. Writes ``table.md``, ``results.json``
and ``bench.png`` into ``--out``, and prints the table. Two seeds run at a time (one per core).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("teacher", "cd", "dmd", "sc-dmd")
COLUMNS = [
    ("energy", "energy ↓", 4),
    ("sw", "sliced W2 ↓", 4),
    ("modes", "modes ↑", 1),
    ("hq_share", "HQ share ↑", 3),
    ("off_manifold", "off-manifold ↓", 4),
    ("precision", "precision ↑", 3),
    ("recall", "recall ↑", 3),
]


def _one_seed(args: tuple[str, int, int, str, dict[str, Any], tuple[str, ...]]) -> dict[str, Any]:
    """Train every student method for one seed; returns ``{method: metrics}`` (run in a worker process)."""
    import torch

    from salt_ref.recipe import PRESETS
    from toy.gmm import make_target
    from toy.setup_2d import Toy2DConfig, build_init, evaluate, run, toy_loop

    target, seed, iters, out, changes, methods = args
    torch.set_num_threads(1)
    gmm = make_target(target)
    recipe = PRESETS["toy"].replace(**changes)
    base = Toy2DConfig(method="dmd", target=target, seed=seed, recipe=recipe)
    res: dict[str, Any] = {"teacher": evaluate(gmm.flow, gmm, base.recipe, n=base.eval_samples, mode="ddim")[0]}
    init = build_init(base, gmm, gmm.flow)
    timings = {}
    for method in methods:
        cfg = Toy2DConfig(method=method, target=target, seed=seed, recipe=recipe)
        loop_cfg = toy_loop(seed, iters=iters, ckpt_every=iters or 1, log_every=10)
        t0 = time.perf_counter()
        _, final = run(cfg, loop_cfg, Path(out) / f"{method}-s{seed}", progress=False, init=init)
        timings[method] = time.perf_counter() - t0
        res[method] = final["metrics"]
    res["seconds"] = timings
    return res


def _fmt(values: list[float], digits: int) -> str:
    arr = np.asarray(values, dtype=float)
    if digits == 1:
        return f"{arr.mean():.1f} ± {arr.std():.1f}"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def make_table(
    per_seed: list[dict[str, Any]], steps: tuple[int, ...] = (1, 2, 4), methods: tuple[str, ...] = METHODS
) -> str:
    """Markdown table: one row per (method, steps), mean ± std over seeds (population std)."""
    head = "| method | steps | " + " | ".join(c[1] for c in COLUMNS) + " | composition defect ↓ |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for method in methods:
        for k in steps:
            cells = [_fmt([r[method][str(k)][key] for r in per_seed], d) for key, _, d in COLUMNS]
            defect = _fmt([r[method]["composition_defect"]["ddim"] for r in per_seed], 4) if k == steps[0] else ""
            lines.append(f"| {method} | {k} | " + " | ".join(cells) + f" | {defect} |")
    return "\n".join(lines)


def make_plot(
    per_seed: list[dict[str, Any]],
    out_png: Path,
    steps: tuple[int, ...] = (1, 2, 4),
    methods: tuple[str, ...] = METHODS,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for key, ax in zip(("energy", "hq_share"), axes[:2], strict=True):
        for m in methods:
            vals = np.array([[r[m][str(k)][key] for k in steps] for r in per_seed])
            ax.errorbar(steps, vals.mean(0), yerr=vals.std(0), marker="o", capsize=3, label=m)
        ax.set_xticks(steps)
        ax.set_xlabel("sampling steps")
        ax.set_title(key)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    defects = [[r[m]["composition_defect"]["ddim"] for r in per_seed] for m in methods]
    axes[2].bar(range(len(methods)), [np.mean(d) for d in defects], yerr=[np.std(d) for d in defects], capsize=3)
    axes[2].set_xticks(range(len(methods)), methods)
    axes[2].set_title("composition defect (8-step DDIM path)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.bench_2d", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="ring8")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=None, help="generator iterations (default: the CLI's)")
    p.add_argument("--out", default="runs/bench_2d")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS[1:]),
        choices=list(METHODS[1:]),
        help="student methods (the teacher row is always included)",
    )
    p.add_argument("--sc-weight", type=float, default=None, help="ablation: lambda of the SC term")
    p.add_argument("--sc-target", choices=["live", "ema"], default=None, help="ablation: v2 from live or EMA")
    p.add_argument("--shift", type=float, default=None, help="ablation: warp of step lists and DMD levels")
    args = p.parse_args(argv)
    from toy.setup_2d import TOY_LOOP

    iters = TOY_LOOP["iters"] if args.iters is None else args.iters
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    changes = {  # recipe ablations
        k: v
        for k, v in {"sc_weight": args.sc_weight, "sc_target": args.sc_target, "shift": args.shift}.items()
        if v is not None
    }
    methods = tuple(args.methods)
    jobs = [(args.target, s, iters, str(out), changes, methods) for s in args.seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        per_seed = list(pool.map(_one_seed, jobs))
    elapsed = time.perf_counter() - t0
    shown = ("teacher", *methods)
    table = make_table(per_seed, methods=shown)
    cmd = "python -m toy.bench_2d " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    header = (
        f"`{cmd.strip()}` — target {args.target}, seeds {args.seeds}, {iters} generator iterations, "
        f"{elapsed / 60:.1f} min wall on this machine\n\n"
    )
    (out / "table.md").write_text(header + table + "\n")
    (out / "results.json").write_text(
        json.dumps({"iters": iters, "seeds": args.seeds, "target": args.target, "per_seed": per_seed}, indent=1)
    )
    make_plot(per_seed, out / "bench.png", methods=shown)
    print(header + table)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'bench.png'}")
    finite = all(math.isfinite(r[m][str(k)]["energy"]) for r in per_seed for m in methods for k in (1, 2, 4))
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())

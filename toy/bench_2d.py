"""The 2D benchmark: {exact teacher, CD, DMD, SC-DMD} x {1, 2, 4} steps on three mixtures, over paired seeds.

    python -m toy.bench_2d [--targets ring8 grid25 mix5] [--seeds 0 1 2 3 4] [--recipe toy] [--out runs/bench_2d]

A *cell* is one training run ``(target, method, seed, SC weight)`` through :func:`toy.setup_2d.run` with the
recipe preset ``--recipe`` and the toy loop (``toy.setup_2d.TOY_LOOP``). Seeds are paired: for one seed every
method starts from the same teacher-fitted MLP, DMD and SC-DMD draw the same step lists, exits and noise, and all
are scored on the same evaluation draw (``toy.setup_2d.eval_seed``), so a per-seed difference is the method's.
The evaluation itself is drawn anew per seed, so the spread over seeds includes its noise. Each target's table
leads with the references of that draw: the exact teacher with 50 DDIM steps and fresh data (the finite-sample
floor); ``energy / teacher`` is a student's energy over the teacher's. The SC-weight sweep (lambda in
``--sc-sweep``, lambda 0 being DMD) runs on ``--sweep-target``.

Every cell writes its own folder under ``--out``; a finished cell is read back and a killed one resumed, so
the benchmark continues where it stopped. Writes ``table.md``, ``results.json``, ``bench.png`` (energy and
mode-share error against steps) and ``samples.png`` (seed 0's samples: teacher against each student at 1/2/4
steps) into ``--out`` and prints the tables. ``--workers`` cells run at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Cell", "cached_init", "run_cell", "reference_cell", "make_tables", "make_plot", "make_samples_plot", "main"]

TARGETS = ("ring8", "grid25", "mix5")
METHODS = ("cd", "dmd", "sc-dmd")
BASELINE = "ode-init"  # the row of the ODE-initialised student before DMD (also every DMD/SC-DMD run's start)
STEPS = (1, 2, 4)
SC_SWEEP = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)  # past 2: up to the weights where SC pulls as hard as DMD
SAVED_SAMPLES = 2000  # per step count, for the samples plot
COLUMNS = [  # (key, header, digits); energy and the mode-share error lead: they are the quality measures
    ("energy", "energy ↓", 4),
    ("mode_tv", "mode TV ↓", 3),
    ("sw", "sliced W2 ↓", 3),
    ("modes", "modes ↑", 1),
    ("hq_share", "HQ share", 3),
    ("precision", "precision ↑", 3),
    ("recall", "recall ↑", 3),
]


@dataclass(frozen=True)
class Cell:
    """One benchmark run: ``method`` on ``target`` with ``seed``; ``sc_weight`` ``None`` is the recipe's."""

    target: str
    method: str
    seed: int
    recipe: str = "toy"
    sc_weight: float | None = None
    loop: dict[str, Any] = field(default_factory=dict)  # changes to the toy loop (the sweep's knobs)
    cfg: dict[str, Any] = field(default_factory=dict)  # changes to Toy2DConfig (batch, ...)
    recipe_changes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.target, self.method, f"s{self.seed}"]
        if self.recipe != "toy":
            parts.insert(0, self.recipe)
        if self.sc_weight is not None:
            parts.append(f"sc{self.sc_weight:g}")
        for k, v in sorted({**self.loop, **self.cfg, **self.recipe_changes}.items()):
            parts.append(f"{k}{v:g}" if isinstance(v, int | float) else f"{k}{v}")
        return "-".join(parts)


def _config(cell: Cell) -> tuple[Any, Any]:
    from salt_ref.recipe import preset
    from toy.setup_2d import Toy2DConfig, toy_loop

    changes = dict(cell.recipe_changes)
    if cell.sc_weight is not None:
        changes["sc_weight"] = cell.sc_weight
    recipe = preset(cell.recipe, **changes)
    cfg = Toy2DConfig(method=cell.method, target=cell.target, seed=cell.seed, recipe=recipe, **cell.cfg)
    return cfg, toy_loop(cell.seed, **{"log_every": 25, **cell.loop})


INIT_FIELDS = ("teacher", "batch", "hidden", "depth", "pretrain_iters", "pretrain_lr", "init", "ode_iters",
               "ode_pairs", "ode_grid_steps", "teacher_iters", "seed")  # fmt: skip


def cached_init(cfg: Any, root: Path) -> Any:
    """The seed's :class:`toy.setup_2d.Toy2DInit`, built once per (target, seed, init settings, grids) and kept
    in ``root / "inits"``: every method and sweep setting of a seed starts from the same weights."""
    import hashlib
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file, save_file

    from toy.gmm import make_target
    from toy.setup_2d import bare_init, build_init, make_teacher

    r = cfg.recipe
    spec = {f: getattr(cfg, f) for f in INIT_FIELDS} | {"target": cfg.target, "shift": r.shift, "steps": r.steps}
    gmm = make_target(cfg.target)
    spec["mixture"] = gmm.to_json()  # the contents, not a file name
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = root / "inits" / f"{Path(cfg.target).stem}-s{cfg.seed}-{key}.safetensors"
    init = bare_init(cfg)
    if path.is_file():
        tensors = load_file(str(path))
        for name, module in (("student", init.student), ("critic", init.critic)):
            module.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")})
        return init
    teacher = make_teacher(cfg, gmm, torch.Generator().manual_seed(cfg.seed + 20_000))
    built = build_init(replace(cfg, method="dmd"), gmm, teacher)  # the ODE init too: CD takes the critic's fit
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{__import__('os').getpid()}.tmp")
    save_file({f"{name}.{k}": v.contiguous() for name, m in (("student", built.student), ("critic", built.critic))
               for k, v in m.state_dict().items()}, str(tmp))  # fmt: skip
    tmp.replace(path)  # atomic: two workers building one init both end with a whole file
    return built


def run_cell(cell: Cell, out_root: str | Path) -> dict[str, Any]:
    """Train (or read back, or resume) one cell; returns its ``final_metrics.json`` plus ``seconds``."""
    import torch
    from safetensors.torch import save_file

    from toy.setup_2d import run

    torch.set_num_threads(1)
    out = Path(out_root) / cell.name
    done = out / "final_metrics.json"
    if done.is_file():
        final = json.loads(done.read_text())
        if final.get("cell") == asdict(cell):
            return final | {"read_back": True}
    cfg, loop_cfg = _config(cell)
    t0 = time.perf_counter()
    resume = (out / "checkpoint.safetensors").is_file()
    init = None if resume else cached_init(cfg, Path(out_root))
    _, final = run(cfg, loop_cfg, out, resume=resume, progress=False, init=init, with_references=False)
    save_file({f"steps{k}": x[:SAVED_SAMPLES].contiguous() for k, x in final.pop("samples").items()},
              str(out / "samples.safetensors"))  # fmt: skip
    final["cell"] = asdict(cell)
    final["seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(final, indent=1))
    return final


def reference_cell(target: str, seed: int, recipe: str = "toy") -> dict[str, Any]:
    """The exact teacher (50 DDIM steps) and the data floor on seed ``seed``'s evaluation draw."""
    import torch

    from salt_ref.recipe import preset
    from toy.gmm import make_target
    from toy.setup_2d import references

    torch.set_num_threads(1)
    return references(make_target(target), preset(recipe), seed=seed)


def pull_cell(target: str, seed: int, spec: dict[str, Any], out_root: str | Path) -> dict[str, float]:
    """:func:`toy.setup_2d.term_gradients` of seed ``seed``'s SC-DMD task at its start (the cached ODE init)."""
    import torch

    from toy.setup_2d import build_task, term_gradients

    torch.set_num_threads(1)
    cfg, _ = _config(Cell(target, "sc-dmd", seed, spec["recipe"], cfg=spec["cfg"]))
    return term_gradients(build_task(cfg, cached_init(cfg, Path(out_root))), seed=seed)


def _against_start(results: dict[str, Any]) -> str:
    """Counts, paired by seed: what DMD-family training did to its start, and 4 steps against 2."""
    if BASELINE not in results["methods"]:
        return ""
    seeds, trained = results["seeds"], [m for m in ("dmd", "sc-dmd") if m in results["methods"]]
    lines = [
        f"**What {' and '.join(trained)} did to their start, the ODE init**: of the {' and '.join(trained)} runs "
        f"({len(seeds)} paired seeds each), how many score higher than their ODE init at 1 / 2 / 4 steps; **and 4 "
        "steps against 2**: how many trained runs (the SC sweep's included) have a 4-step energy above their own "
        "2-step one",
        "",
        "| target | energy higher | precision higher | recall higher | mode TV higher | 4-step energy above 2-step |",
        "|---|---|---|---|---|---|",
    ]
    for target in results["targets"]:
        row = [target]
        for key in ("energy", "precision", "recall", "mode_tv"):
            counts = [sum(_get(results, target, m, s, k, key) > _get(results, target, BASELINE, s, k, key)
                          for m in trained for s in seeds) for k in STEPS]  # fmt: skip
            row.append(" / ".join(str(c) for c in counts) + f" of {len(trained) * len(seeds)}")
        finals = {c: f for c, f in results["cells"].items() if f["cell"]["target"] == target
                  and f["cell"]["method"] in trained and f["iterations"] > 0}  # fmt: skip
        above = sum(_metric(f, 4, "energy") > _metric(f, 2, "energy") for f in finals.values())
        row.append(f"{above} of {len(finals)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _pull_table(results: dict[str, Any]) -> str:
    from salt_ref.recipe import preset

    lam = preset(results["recipe"]).sc_weight
    lines = [
        "**How hard the SC term pulls, at the ODE init** (`toy.setup_2d.term_gradients`: norms of each term's "
        "gradient over the student's weights on 32 draws that take the SC term, median per seed; mean ± std over "
        f"seeds {results['seeds']})",
        "",
        f"| target | ‖∇ L_DMD‖ | ‖∇ L_SC‖ (λ = 1) | ‖∇ L_DMD‖ / ‖∇ L_SC‖ (the λ of equal pull) | the SC pull at the "
        f"recipe's λ = {lam:g}, as a share of DMD's | cos(∇ L_DMD, ∇ L_SC) |",
        "|---|---|---|---|---|---|",
    ]
    for target in results["targets"]:
        rows = [results["pull"][f"{target}-s{s}"] for s in results["seeds"]]
        rows = [r | {"share": lam / r["ratio"]} for r in rows]
        cells = [_fmt([r[k] for r in rows], d)
                 for k, d in (("dmd", 3), ("sc", 4), ("ratio", 1), ("share", 3), ("cos", 2))]  # fmt: skip
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(values: list[float], digits: int) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def _metric(final: dict[str, Any], k: int, key: str) -> float:
    return float(final["metrics"][str(k)][key])


def make_tables(results: dict[str, Any]) -> str:
    """One markdown table per target (mean ± population std over seeds), then the paired comparison and the
    SC-weight sweep."""
    seeds, out = results["seeds"], []
    for target in results["targets"]:
        refs = [results["references"][f"{target}-s{s}"] for s in seeds]
        teacher_energy = np.mean([r["teacher"]["energy"] for r in refs])
        head = "| method | steps | " + " | ".join(c[1] for c in COLUMNS) + " | energy / teacher | defect (SC's loss) |"
        lines = [f"**{target}**", "", head, "|" + "---|" * (len(COLUMNS) + 4)]
        for label, key in (("exact teacher, DDIM", "teacher"), ("data (floor)", "data")):
            cells = [_fmt([r[key][c] for r in refs], d) for c, _, d in COLUMNS]
            ratio = _fmt([r[key]["energy"] / r["teacher"]["energy"] for r in refs], 2)
            steps = str(refs[0]["teacher"]["steps"]) if key == "teacher" else "–"
            defect = _fmt([r["teacher"]["composition_defect"] for r in refs], 3) if key == "teacher" else ""
            lines.append(f"| {label} | {steps} | " + " | ".join(cells) + f" | {ratio} | {defect} |")
        for method in results["methods"]:
            finals = [results["cells"][_cell(results, target, method, s).name] for s in seeds]
            for k in STEPS:
                cells = [_fmt([_metric(f, k, c) for f in finals], d) for c, _, d in COLUMNS]
                ratio = _fmt(
                    [_metric(f, k, "energy") / r["teacher"]["energy"] for f, r in zip(finals, refs, strict=True)], 2
                )
                defect = _fmt([f["metrics"]["composition_defect"]["ddim"] for f in finals], 3) if k == STEPS[0] else ""
                lines.append(f"| {method} | {k} | " + " | ".join(cells) + f" | {ratio} | {defect} |")
        best = min(
            (np.mean([_metric(results["cells"][_cell(results, target, m, s).name], 4, "energy") for s in seeds]), m)
            for m in results["methods"]
        )
        best_tv = np.mean([_metric(results["cells"][_cell(results, target, best[1], s).name], 4, "mode_tv")
                           for s in seeds])  # fmt: skip
        verdict = "met" if best[0] <= 2 * teacher_energy and best_tv <= 0.05 else "NOT met"
        lines += ["", f"Target (best 4-step student within 2x of the teacher's energy, mode TV <= 0.05): {verdict} — "
                  f"{best[1]} at {best[0]:.4f} = {best[0] / teacher_energy:.2f}x the teacher's {teacher_energy:.4f}, "
                  f"mode TV {best_tv:.3f}", ""]  # fmt: skip
        out.append("\n".join(lines))
    out.append(_paired(results))
    out.append(_against_start(results))
    if results.get("pull"):
        out.append(_pull_table(results))
    if results.get("sweep"):
        out.append(_sweep_table(results))
    return "\n\n".join(out)


def _paired(results: dict[str, Any]) -> str:
    """SC-DMD minus DMD per seed (paired): mean difference and in how many seeds SC-DMD is lower."""
    if not {"dmd", "sc-dmd"} <= set(results["methods"]):
        return ""
    lines = [
        "**SC-DMD against DMD, paired by seed** (difference SC-DMD − DMD: mean ± std; seeds where SC-DMD is lower)",
        "",
        "| target | steps | Δ energy | lower in | Δ mode TV | lower in |",
        "|---|---|---|---|---|---|",
    ]
    seeds = results["seeds"]
    for target in results["targets"]:
        for k in STEPS:
            row = [f"| {target} | {k} "]
            for key in ("energy", "mode_tv"):
                d = [
                    _get(results, target, "sc-dmd", s, k, key) - _get(results, target, "dmd", s, k, key) for s in seeds
                ]
                row.append(f"| {np.mean(d):+.4f} ± {np.std(d):.4f} | {sum(x < 0 for x in d)}/{len(d)} ")
            lines.append("".join(row) + "|")
    return "\n".join(lines)


def _sweep_table(results: dict[str, Any]) -> str:
    target, seeds = results["sweep_target"], results["sweep_seeds"]
    lines = [
        f"**SC weight sweep on {target}** (lambda 0 is DMD; mean ± std over seeds {seeds})",
        "",
        "| lambda | energy 1 | energy 2 | energy 4 | mode TV 4 | defect (SC's loss) |",
        "|---|---|---|---|---|---|",
    ]
    for lam in results["sweep"]:
        finals = [results["cells"][_sweep_cell(results, target, lam, s).name] for s in seeds]
        cells = [_fmt([_metric(f, k, "energy") for f in finals], 4) for k in STEPS]
        cells.append(_fmt([_metric(f, 4, "mode_tv") for f in finals], 3))
        cells.append(_fmt([f["metrics"]["composition_defect"]["ddim"] for f in finals], 3))
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(results: dict[str, Any], target: str, method: str, seed: int) -> Cell:
    if method == BASELINE:  # the student before distillation: a DMD cell with no iterations
        loop = {**results["loop"], "iters": 0, "ema_start": 0}
        return Cell(target, "dmd", seed, results["recipe"], loop=loop, cfg=results["cfg"])
    return Cell(target, method, seed, results["recipe"], loop=results["loop"], cfg=results["cfg"])


def _get(results: dict[str, Any], target: str, method: str, seed: int, k: int, key: str) -> float:
    return _metric(results["cells"][_cell(results, target, method, seed).name], k, key)


def _sweep_cell(results: dict[str, Any], target: str, lam: float, seed: int) -> Cell:
    # lambda 0 is the DMD cell itself and the recipe's lambda the SC-DMD cell, so the sweep reuses those runs
    from salt_ref.recipe import preset

    if lam == 0:
        return _cell(results, target, "dmd", seed)
    if lam == preset(results["recipe"]).sc_weight:
        return _cell(results, target, "sc-dmd", seed)
    return Cell(target, "sc-dmd", seed, results["recipe"], sc_weight=lam, loop=results["loop"], cfg=results["cfg"])


def make_plot(results: dict[str, Any], out_png: Path) -> None:
    """Energy (log) and mode-share error against steps, one column per target, teacher and floor as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, seeds, r = results["targets"], results["seeds"], results["recipe"]
    fig, axes = plt.subplots(2, len(targets), figsize=(3.6 * len(targets), 5.6), squeeze=False)
    for j, target in enumerate(targets):
        refs = [results["references"][f"{target}-s{s}"] for s in seeds]
        for i, key in enumerate(("energy", "mode_tv")):
            ax = axes[i, j]
            for method in results["methods"]:
                vals = np.array([[_get(results, target, method, s, k, key) for k in STEPS] for s in seeds])
                ax.errorbar(STEPS, vals.mean(0), yerr=vals.std(0), marker="o", capsize=3, label=method)
            ax.axhline(np.mean([x["teacher"][key] for x in refs]), color="k", ls="--", lw=1, label="teacher, 50 DDIM")
            ax.axhline(np.mean([x["data"][key] for x in refs]), color="grey", ls=":", lw=1, label="data (floor)")
            ax.set_xticks(STEPS)
            ax.set_yscale("log")
            ax.set_xlabel("sampling steps")
            ax.set_ylabel({"energy": "energy distance ↓", "mode_tv": "mode-share TV ↓"}[key])
            ax.set_title(f"{target}: {key}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"toy.bench_2d, recipe {r!r}, seeds {seeds} (mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def make_samples_plot(results: dict[str, Any], out_png: Path, n: int = 2000) -> None:
    """Seed 0's samples on every target: the exact teacher (50 DDIM) and each student at 1/2/4 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from safetensors.torch import load_file

    from salt_ref.recipe import preset
    from toy.gmm import make_target
    from toy.setup_2d import TEACHER_STEPS, evaluate

    seed, r = results["seeds"][0], results["recipe"]
    targets, methods = results["targets"], results["methods"]
    fig, axes = plt.subplots(len(targets), 1 + len(methods) * len(STEPS), figsize=(1.6 * (1 + 3 * len(methods)),
                             1.7 * len(targets)), squeeze=False)  # fmt: skip
    for i, target in enumerate(targets):
        gmm = make_target(target)
        ref = results["references"][f"{target}-s{seed}"]["teacher"]
        _, teacher = evaluate(gmm.flow, gmm, preset(r), n=n, n_modes=n, steps=(TEACHER_STEPS,), mode="ddim", seed=seed)
        panels = [(f"teacher {TEACHER_STEPS} DDIM\nE {ref['energy']:.4f}", teacher[TEACHER_STEPS])]
        for method in methods:
            cell = _cell(results, target, method, seed)
            xs = load_file(str(Path(results["out"]) / cell.name / "samples.safetensors"))
            final = results["cells"][cell.name]
            panels += [(f"{method} {k}\nE {_metric(final, k, 'energy'):.4f}", xs[f"steps{k}"][:n]) for k in STEPS]
        lim = float(gmm.means.abs().max()) + 1.0
        for ax, (title, x) in zip(axes[i], panels, strict=True):
            x = x[torch.isfinite(x).all(1)].numpy()
            ax.scatter(x[:, 0], x[:, 1], s=0.6, alpha=0.5, color="C0" if "teacher" in title else "C1")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
        axes[i, 0].set_ylabel(target)
    fig.suptitle(f"samples, seed {seed} (E: energy distance ↓, from table.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from salt_ref.recipe import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m toy.bench_2d",
        description="The 2D benchmark: teacher, CD, DMD and SC-DMD at 1/2/4 steps on mixtures, paired seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", default=list(TARGETS), help="mixtures (names or .json files)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="paired seeds")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="student methods")
    p.add_argument("--recipe", default="toy", choices=sorted(PRESETS), help="recipe preset ('toy-video': the "
                   "video recipe on 2D, the ablation)")  # fmt: skip
    p.add_argument("--sc-sweep", type=float, nargs="*", default=list(SC_SWEEP), help="SC weights swept (empty: none)")
    p.add_argument("--sweep-target", default="mix5", help="the target of the SC-weight sweep")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=None, help="seeds of the sweep (default: --seeds)")
    p.add_argument("--iters", type=int, default=None, help="generator iterations (default: the toy loop's)")
    p.add_argument("--init-iters", type=int, default=None, help="flow-fit and ODE-init steps (default: Toy2DConfig's)")
    p.add_argument("--init", choices=["ode", "flow"], default=None, help="the students' start (default: Toy2DConfig's)")
    p.add_argument("--lr-gen", type=float, default=None, help="generator learning rate (default: the toy loop's)")
    p.add_argument("--out", default="runs/bench_2d", help="output folder (cells are resumed from it)")
    p.add_argument("--workers", type=int, default=2, help="cells trained at a time")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    if args.init_iters is not None and args.init_iters < 0:
        p.error(f"--init-iters must be >= 0, got {args.init_iters}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loop = {k: v for k, v in (("iters", args.iters), ("lr_gen", args.lr_gen)) if v is not None}
    cfg = {} if args.init_iters is None else {"pretrain_iters": args.init_iters, "ode_iters": args.init_iters}
    if args.init is not None:
        cfg["init"] = args.init
    sweep = args.sc_sweep if args.sweep_target in args.targets and {"dmd", "sc-dmd"} <= set(args.methods) else []
    spec = {"recipe": args.recipe, "loop": loop, "cfg": cfg}
    with_baseline = {"dmd", "sc-dmd"} & set(args.methods) and cfg.get("init", "ode") == "ode"
    methods = [BASELINE, *args.methods] if with_baseline else list(args.methods)
    cells = [_cell(spec, t, m, s) for t in args.targets for m in methods for s in args.seeds]
    sweep_seeds = args.sweep_seeds or args.seeds
    cells += [_sweep_cell(spec, args.sweep_target, lam, s) for lam in sweep for s in sweep_seeds]
    # the sweep's lambda 0 and default lambda are the DMD / SC-DMD cells: keep one of each name
    cells = list({c.name: c for c in cells}.values())
    t0 = time.perf_counter()
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        ref_jobs = {
            f"{t}-s{s}": pool.submit(reference_cell, t, s, args.recipe) for t in args.targets for s in args.seeds
        }
        jobs = {c.name: pool.submit(run_cell, c, out) for c in cells}
        finals = {}
        for name, job in tqdm(jobs.items(), desc="bench_2d cells", unit="run"):
            finals[name] = job.result()
        references = {k: j.result() for k, j in ref_jobs.items()}
        pull = {}
        if "sc-dmd" in args.methods and cfg.get("init", "ode") == "ode":
            pull_jobs = {f"{t}-s{s}": pool.submit(pull_cell, t, s, spec, out) for t in args.targets for s in args.seeds}
            pull = {k: j.result() for k, j in pull_jobs.items()}
    elapsed = time.perf_counter() - t0
    results = {
        "command": "python -m toy.bench_2d " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recipe": args.recipe,
        "targets": args.targets,
        "methods": methods,
        "seeds": args.seeds,
        "sweep": sweep,
        "sweep_target": args.sweep_target,
        "sweep_seeds": sweep_seeds,
        "loop": loop,
        "cfg": cfg,
        "out": str(out),
        "references": references,
        "pull": pull,
        "cells": finals,
        "minutes": elapsed / 60,
    }
    tables = make_tables(results)
    trained = sum(not f.get("read_back") for f in finals.values())
    header = (f"`{results['command'].strip()}` — recipe {args.recipe!r}, seeds {args.seeds}: {len(cells)} runs, "
              f"{trained} of them trained by this invocation (the rest read back from --out), "
              f"{elapsed / 60:.1f} min wall\n\n")  # fmt: skip
    (out / "table.md").write_text(header + tables + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    make_plot(results, out / "bench.png")
    make_samples_plot(results, out / "samples.png")
    print(header + tables)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'bench.png'}, {out / 'samples.png'}")
    finite = all(math.isfinite(_metric(f, k, "energy")) for f in finals.values() for k in STEPS)
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())

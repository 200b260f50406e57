"""How the 2D preset's optimisation settings and start were chosen: a one-knob-at-a-time sweep around a base.

    python -m toy.sweep_2d [--targets ring8 grid25 mix5] [--seeds 0 1] [--method dmd] [--out runs/sweep_2d]

From the fixed base :data:`BASE`, each knob of :data:`KNOBS` is moved to each of
its other values with the rest held, and every setting is trained on every target and seed through
:func:`toy.bench_2d.run_cell` (so the cells are resumed and shared like the benchmark's). The score of a setting
is its 4-step energy over the exact teacher's 50-step DDIM energy on the same evaluation draw, averaged over
targets and seeds (geometric mean), with the mean mode-share error and the mean 4-step precision beside it (the
energy distance cannot see spread at a mode's width; precision can). Writes ``sweep.md`` and
``sweep.json`` into ``--out`` and prints the table; the preset's values are what this table chose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from toy.bench_2d import Cell, reference_cell, run_cell

__all__ = ["BASE", "KNOBS", "settings", "main"]

# The sweep's centre, fixed here (not read from the preset) so that re-running it reproduces the table the
# preset was chosen from.
BASE: dict[str, Any] = {"shift": 1.0, "iters": 300, "lr_gen": 1e-4, "lr_critic": 1e-3, "critic_ratio": 5,
                        "dmd_normalizer": "sample", "ode_iters": 6000, "pretrain_lr": 3e-3}  # fmt: skip
# knob -> (where it lives, values tried); iters 0 is the ODE init alone
KNOBS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "iters": ("loop", (0, 300)),
    "lr_gen": ("loop", (1e-4, 3e-4)),
    "critic_ratio": ("loop", (2, 5)),
    "lr_critic": ("loop", (1e-3,)),  # held: the critic's rate was not swept
    "dmd_normalizer": ("recipe_changes", ("sample", "batch")),
    "shift": ("recipe_changes", (1.0, 3.0)),
    "ode_iters": ("cfg", (1500, 6000)),  # the start: ODE-init steps (the flow fit keeps its own 1500)
    "pretrain_lr": ("cfg", (1e-3, 3e-3)),  # the start: the flow fit's and the ODE init's rate
}


def settings() -> list[tuple[str, Any]]:
    """``[("base", None), (knob, value), ...]``: the base and every one-knob change from it."""
    out: list[tuple[str, Any]] = [("base", None)]
    for knob, (_, values) in KNOBS.items():
        out += [(knob, v) for v in values if v != BASE[knob]]
    return out


def _cell(target: str, method: str, seed: int, knob: str, value: Any) -> Cell:
    """The cell of ``BASE`` with ``knob`` set to ``value`` (every setting spelled out, so the preset's own
    values never leak in)."""
    setting = dict(BASE) if knob == "base" else {**BASE, knob: value}
    parts: dict[str, dict[str, Any]] = {"loop": {}, "recipe_changes": {}, "cfg": {}}
    for k, v in setting.items():
        parts[KNOBS[k][0]][k] = v
    return Cell(target, method, seed, loop={**parts["loop"], "ema_start": setting["iters"] // 6},
                recipe_changes=parts["recipe_changes"], cfg=parts["cfg"])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m toy.sweep_2d",
        description="One-knob-at-a-time sweep of the 2D preset's shift, budget, rates, critic ratio and start.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", default=["ring8", "grid25", "mix5"], help="mixtures")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per setting")
    p.add_argument("--method", default="dmd", choices=["dmd", "sc-dmd"], help="the method swept")
    p.add_argument("--out", default="runs/sweep_2d", help="output folder (cells are resumed from it)")
    p.add_argument("--workers", type=int, default=2, help="cells trained at a time")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = settings()
    t0 = time.perf_counter()
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        refs = {(t, s): pool.submit(reference_cell, t, s) for t in args.targets for s in args.seeds}
        jobs = {(k, str(v), t, s): pool.submit(run_cell, _cell(t, args.method, s, k, v), out)
                for k, v in grid for t in args.targets for s in args.seeds}  # fmt: skip
        finals = {key: job.result() for key, job in tqdm(jobs.items(), desc="sweep_2d cells", unit="run")}
        teacher = {key: job.result()["teacher"]["energy"] for key, job in refs.items()}
    rows = []
    for k, v in grid:
        ratios = [finals[(k, str(v), t, s)]["metrics"]["4"]["energy"] / teacher[(t, s)]
                  for t in args.targets for s in args.seeds]  # fmt: skip
        tvs = [finals[(k, str(v), t, s)]["metrics"]["4"]["mode_tv"] for t in args.targets for s in args.seeds]
        per_target = {t: float(np.mean([finals[(k, str(v), t, s)]["metrics"]["4"]["energy"] / teacher[(t, s)]
                                        for s in args.seeds])) for t in args.targets}  # fmt: skip
        precision = [finals[(k, str(v), t, s)]["metrics"]["4"]["precision"] for t in args.targets for s in args.seeds]
        rows.append({"knob": k, "value": v, "ratio": float(np.exp(np.mean(np.log(ratios)))),
                     "mode_tv": float(np.mean(tvs)), "precision": float(np.mean(precision)),
                     "per_target": per_target})  # fmt: skip
    minutes = (time.perf_counter() - t0) / 60
    cmd = "python -m toy.sweep_2d " + " ".join(argv if argv is not None else sys.argv[1:])
    trained = sum(not f.get("read_back") for f in finals.values())
    lines = [f"`{cmd.strip()}` — {args.method}, seeds {args.seeds}: {len(finals)} runs, {trained} of them trained by "
             f"this invocation (the rest read back from --out), {minutes:.1f} min wall", "",
             "| knob | value | 4-step energy / teacher (geo. mean) ↓ | " + " | ".join(args.targets)
             + " | mode TV at 4 ↓ | precision at 4 ↑ |",
             "|---|---|---|" + "---|" * len(args.targets) + "---|---|"]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['per_target'][t]:.2f}" for t in args.targets)
        value = "base" if r["knob"] == "base" else str(r["value"])
        lines.append(f"| {r['knob']} | {value} | {r['ratio']:.2f} | {cells} | {r['mode_tv']:.3f} | "
                     f"{r['precision']:.3f} |")  # fmt: skip
    table = "\n".join(lines)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps({"command": cmd, "rows": rows, "minutes": minutes}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

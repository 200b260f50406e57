"""Does a larger SC weight lower the SC loss itself? ``python scripts/sc_loss_by_weight.py [--weights 0.2 20]``

Trains SC-DMD on mix5, seed 0, from the benchmark's cached ODE init (``runs/bench_2d/inits``, built if missing)
with the toy loop, once per SC weight, logging every iteration, and prints per weight the median ``loss_sc`` over
the first, middle and last third of the draws that take the SC term (exits ``k > 0``: at ``k = 0`` the weight
``1 - s`` is 0), the composition defect and the 4-step energy of the EMA student. One thread; about 40 s a weight.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from salt_ref.recipe import PRESETS
from toy.bench_2d import cached_init
from toy.setup_2d import Toy2DConfig, run, toy_loop

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--weights", type=float, nargs="+", default=[0.2, 20.0], help="SC weights lambda")
p.add_argument("--target", default="mix5")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="runs/sc_loss_by_weight")
args = p.parse_args()
torch.set_num_threads(1)
for lam in args.weights:
    cfg = Toy2DConfig(method="sc-dmd", target=args.target, seed=args.seed, recipe=PRESETS["toy"].replace(sc_weight=lam))
    out = Path(args.out) / f"sc{lam:g}"
    _, final = run(cfg, toy_loop(args.seed, log_every=1), out, init=cached_init(cfg, Path("runs/bench_2d")),
                   progress=False, with_references=False)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sc = np.array([r["loss_sc"] for r in rows if "loss_sc" in r and r["exit"] > 0])
    thirds = [float(np.median(t)) for t in np.array_split(sc, 3)]
    print(json.dumps({"lambda": lam, "draws_with_sc": len(sc), "loss_sc_median_by_third": [f"{v:.2e}" for v in thirds],
                      "composition_defect": round(final["metrics"]["composition_defect"]["ddim"], 4),
                      "energy_4": round(final["metrics"]["4"]["energy"], 4)}), flush=True)  # fmt: skip

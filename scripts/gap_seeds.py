"""The LQ/HQ cache gap of the benchmark's students on more clips: ``python scripts/gap_seeds.py [N_PER_CLASS]``.

Reads the trained runs of ``runs/bench_video`` and prints, per method, memory policy and length, the tint-drift
gap (LQ - HQ) of every seed, their mean ± std and mean / std (one thread).
"""

import sys
from pathlib import Path

import numpy as np
import torch

from salt_ref.kv_cache import MemoryPolicy
from toy.run_video import cache_quality_gap, load_run

torch.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
for method in ("self-forcing", "salt"):
    for memory in ("full", "sink:2+window:4"):
        rope = "absolute" if memory == "full" else "relative"
        for h in (1, 4):
            gaps = []
            for seed in (0, 1, 2):
                student, cfg, _ = load_run(Path(f"runs/bench_video/{method}-s{seed}"))
                res = cache_quality_gap(
                    student, cfg, n_per_class=n, frames=h * cfg.frames, memory=MemoryPolicy.parse(memory), rope=rope
                )
                gaps.append(res["gap_appearance"])
            g = np.array(gaps)
            print(
                f"{method:12s} {memory:16s} {h}x  {n * 4} clips: gaps {np.round(g, 4).tolist()}  "
                f"mean {g.mean():+.4f} ± {g.std():.4f}  ({g.mean() / g.std():.1f} spreads)",
                flush=True,
            )

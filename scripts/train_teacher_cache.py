"""Train (or find) the small setup's teacher and ODE init under runs/cache, one thread:
``python scripts/train_teacher_cache.py [--teacher-iters N]`` (the teacher once; reruns only find it)."""

import sys
import time

import torch

from toy.setup_video import CACHE_DIR, SmallVideoConfig, get_student_init, get_teacher

torch.set_num_threads(1)
# --teacher-iters N: another teacher budget (each budget is cached under its own key)
iters = int(sys.argv[sys.argv.index("--teacher-iters") + 1]) if "--teacher-iters" in sys.argv else None
cfg = SmallVideoConfig() if iters is None else SmallVideoConfig(teacher_iters=iters)
t0 = time.perf_counter()
teacher = get_teacher(cfg, CACHE_DIR, progress=False)
print(f"teacher {cfg.teacher_key()} ready in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
t1 = time.perf_counter()
get_student_init(cfg, teacher, CACHE_DIR, progress=False)
print(f"init {cfg.init_key()} ready in {(time.perf_counter() - t1) / 60:.1f} min", flush=True)

"""The small setup's teacher (and the world) measured like the students:
``python scripts/teacher_look.py [--teacher-iters N] [--steps K] [--cfg W]``.

Samples the cached teacher (CFG, the ODE-init DDIM grid; ``--steps`` / ``--cfg`` override the recipe's grid length
and CFG scale, to tell the network's faults from the sampler's), 8 clips per class at the trained length, and prints
fidelity, motion, tint drift and ``physics_stats`` next to the world's own clips (one thread).
"""

import json
import sys

import torch

from salt_ref.pretrain import teacher_trajectories
from toy import video_metrics as vm
from toy import video_world as vw
from toy.setup_video import CACHE_DIR, ClassPrompts, SmallVideoConfig, get_teacher

torch.set_num_threads(1)
# --teacher-iters N: another teacher budget (each budget is cached under its own key)


def flag(name: str, kind: type, default):
    return kind(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


iters = flag("--teacher-iters", int, None)
cfg = SmallVideoConfig() if iters is None else SmallVideoConfig(teacher_iters=iters)
world = cfg.world_config()
teacher = get_teacher(cfg, CACHE_DIR, progress=False)
prompts = ClassPrompts(world, teacher.config.text_len, teacher.config.text_dim)
labels = torch.arange(world.n_classes).repeat_interleave(8)
noise = torch.randn(len(labels), 3, cfg.frames, cfg.size, cfg.size, generator=torch.Generator().manual_seed(5))
steps = flag("--steps", int, cfg.ode_grid_steps)
cfg_scale = flag("--cfg", float, cfg.recipe.cfg_scale)
grid = cfg.recipe.sigmas(steps)
with torch.no_grad():
    pairs = teacher_trajectories(
        teacher,
        noise,
        prompts.embed(labels),
        prompts.null(len(labels)),
        grid,
        grid[-1:],
        cfg_scale=cfg_scale,
    )
video = pairs.states[:, -1]
ref, _, _ = vw.sample(len(labels), torch.Generator().manual_seed(6), config=world, frames=cfg.frames, label=labels)
out = {
    "teacher": vm.evaluate_video(video, labels, ref, config=world, chunk_frames=cfg.chunk_frames),
    "world": vm.evaluate_video(ref, labels, ref, config=world, chunk_frames=cfg.chunk_frames),
}
print(
    f"teacher {cfg.teacher_key()} ({cfg.teacher_iters} iterations), {len(labels)} clips,",
    f"{steps}-step DDIM, CFG {cfg_scale}",
)
print(json.dumps({k: {m: round(v, 4) for m, v in d.items()} for k, d in out.items()}, indent=1))
vw.save_frame_grid(video[::8], "runs/notes/teacher_frames.png", labels=labels[::8])

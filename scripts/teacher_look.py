r"""The small setup's teacher (and the world) measured like the students:
``python scripts/teacher_look.py [--teacher-iters N] [--teacher-shift S] [--patch P] [--dim D] [--layers L]
[--frames F] [--teacher network|exact] [--steps K] [--cfg W] [--shift S] [--sampler ddim|ancestral]
[--start-sigma S]``.

Samples the cached teacher (CFG, the ODE-init DDIM grid; ``--steps`` / ``--cfg`` / ``--shift`` override the recipe's
grid length, CFG scale and grid shift, to tell the network's faults from the sampler's; ``--teacher-iters`` /
``--teacher-shift`` / ``--patch`` / ``--dim`` / ``--layers`` / ``--frames`` (its clip length) pick another teacher,
trained and cached under its own key if absent; ``--teacher exact`` the exact flow of a bank of world clips,
``toy.exact_video``), 8 clips per class at the trained length, and prints fidelity,
motion, tint drift and ``physics_stats`` next to the world's own clips (one thread). ``--sampler ancestral`` samples
the same grid with the stochastic DDPM-posterior update (``salt_ref.updates.ancestral_update``, seeded): the
distribution the teacher's scores describe, the one DMD's students are pulled towards, where DDIM gives the one its
ODE transports the noise to.

``--start-sigma S`` < 1 starts from the world's own clips (the ``world`` column's) noised to level ``S`` with the
same noise and runs only the grid's levels below ``S`` (SDEdit): the motion that comes out is what the teacher
makes of clips whose coarse layout is already fixed above ``S``, so a sweep of ``S`` shows at which noise levels
the speed is lost.

It also prints how the motion moves, to see whether the discs snap to the token grid: ``grid_tv``
(``toy.video_metrics.patch_grid_tv`` at the teacher's patch size: ~0 up to sampling noise for the world's discs,
higher for discs that prefer some offsets within a patch), and ``steps``, the 10/50/90% quantiles of the
frame-to-frame displacements ``|c_{f+1} - c_f|`` of the fitted centres ``c [N, F, 2]`` (a disc that sticks and then
jumps has a low 10% and a high 90% quantile).
"""

import json
import sys

import torch

from salt_ref.dmd import cfg as apply_cfg
from salt_ref.pretrain import teacher_trajectories
from salt_ref.schedule import add_noise, sigma_to_t
from salt_ref.updates import sample
from toy import video_metrics as vm
from toy import video_world as vw
from toy.setup_video import CACHE_DIR, ClassPrompts, SmallVideoConfig, get_teacher, real_teacher

torch.set_num_threads(1)
# --teacher-iters N: another teacher budget (each budget is cached under its own key)


def flag(name: str, kind: type, default):
    return kind(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


iters = flag("--teacher-iters", int, SmallVideoConfig.teacher_iters)
try:
    cfg = SmallVideoConfig(
        teacher_iters=iters,
        patch=flag("--patch", int, SmallVideoConfig.patch),
        dim=flag("--dim", int, SmallVideoConfig.dim),
        layers=flag("--layers", int, SmallVideoConfig.layers),
        frames=flag("--frames", int, SmallVideoConfig.frames),
        teacher_shift=flag("--teacher-shift", float, SmallVideoConfig.teacher_shift),
        teacher=flag("--teacher", str, SmallVideoConfig.teacher),
    )
except ValueError as e:
    raise SystemExit(f"bad setting: {e}") from None
world = cfg.world_config()
teacher = real_teacher(cfg, get_teacher(cfg, CACHE_DIR, progress=False))
prompts = ClassPrompts(world, teacher.config.text_len, teacher.config.text_dim)
labels = torch.arange(world.n_classes).repeat_interleave(8)
noise = torch.randn(len(labels), 3, cfg.frames, cfg.size, cfg.size, generator=torch.Generator().manual_seed(5))
steps = flag("--steps", int, cfg.ode_grid_steps)
cfg_scale = flag("--cfg", float, cfg.recipe.cfg_scale)
shift = flag("--shift", float, cfg.recipe.shift)
grid = cfg.recipe.replace(shift=shift).sigmas(steps)
sampler = flag("--sampler", str, "ddim")
if sampler not in ("ddim", "ancestral"):
    raise SystemExit(f"--sampler must be ddim or ancestral, got {sampler!r}")
context, null = prompts.embed(labels), prompts.null(len(labels))
ref, _, _ = vw.sample(len(labels), torch.Generator().manual_seed(6), config=world, frames=cfg.frames, label=labels)
start = flag("--start-sigma", float, 1.0)
if not 0.0 < start <= 1.0:
    raise SystemExit(f"--start-sigma must be in (0, 1], got {start}")
if start < 1.0:  # SDEdit: the world's own clips noised to `start`, then the rest of the grid below it
    grid = torch.cat([grid.new_tensor([start]), grid[grid < start]])
    noise = add_noise(ref, noise, start)


def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The teacher's flow with CFG, as DMD's real score and the ODE init use it."""
    v_cond, v_null = teacher(
        torch.cat([x, x]), sigma_to_t(torch.cat([sigma, sigma])), torch.cat([context, null])
    ).chunk(2)
    return apply_cfg(v_cond, v_null, cfg_scale)


with torch.no_grad():
    if sampler == "ddim":  # the ODE init's own trajectories
        video = teacher_trajectories(teacher, noise, context, null, grid, grid[-1:], cfg_scale=cfg_scale).states[:, -1]
    else:
        video = sample(guided, noise, grid, mode="ancestral", generator=torch.Generator().manual_seed(7))


def grid_motion(clips: torch.Tensor) -> dict[str, float]:
    """``grid_tv`` and the displacement quantiles ``step_q10/50/90`` of ``clips [N, C, F, S, S]`` (docstring above)."""
    c = vm.fit_frames(clips, config=world).centre
    q = torch.quantile((c[:, 1:] - c[:, :-1]).norm(dim=-1).flatten(), torch.tensor([0.1, 0.5, 0.9]))
    steps = {f"step_q{k}": float(v) for k, v in zip((10, 50, 90), q, strict=True)}
    return {"grid_tv": vm.patch_grid_tv(clips, cfg.patch, config=world), **steps}


out = {
    "teacher": vm.evaluate_video(video, labels, ref, config=world, chunk_frames=cfg.chunk_frames) | grid_motion(video),
    "world": vm.evaluate_video(ref, labels, ref, config=world, chunk_frames=cfg.chunk_frames) | grid_motion(ref),
}
print(
    f"exact teacher ({cfg.exact_bank} world clips)," if cfg.teacher == "exact" else "",
    f"teacher {cfg.teacher_key()} ({cfg.teacher_iters} iterations at shift {cfg.teacher_shift}, patch {cfg.patch},",
    f"dim {cfg.dim}, {cfg.layers} layers, {cfg.frames} frames),",
    f"{len(labels)} clips,",
    f"{steps}-step {sampler} at shift {shift}, CFG {cfg_scale}",
    f"from the world's clips noised to {start}" if start < 1.0 else "from noise",
)
print(json.dumps({k: {m: round(v, 4) for m, v in d.items()} for k, d in out.items()}, indent=1))
vw.save_frame_grid(video[::8], "runs/notes/teacher_frames.png", labels=labels[::8])

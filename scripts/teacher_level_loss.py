r"""Held-out flow-matching loss of the small setup's cached teachers, level by level:
``python scripts/teacher_level_loss.py SPEC [SPEC ...]``, a ``SPEC`` being ``key=value`` settings of
:class:`toy.setup_video.SmallVideoConfig` joined by commas (``teacher_iters=12000``, ``layers=8,dim=256``; ``-``
for the preset's own teacher; ``teacher=exact`` or ``teacher=exact,exact_bank=80000`` for the exact flow of a bank
of world clips, ``toy.exact_video``). A network teacher absent from ``runs/cache`` is trained and cached first.

For 256 fresh world clips ``x0 [256, C, F, S, S]`` (seed 11, the same for every teacher), noise ``eps`` and each
level ``sigma`` in ``LEVELS``, it prints the conditional flow-matching loss the teacher was trained on,

    L(sigma) = mean || v_theta(x_sigma, t(sigma), c) - (eps - x0) ||^2,   x_sigma = (1 - sigma) x0 + sigma eps,

with the class prompt ``c`` (no CFG, no dropout). ``L`` has a floor above zero, the spread of ``eps - x0`` given
``x_sigma``, which is largest at high ``sigma`` where a clip is nearly noise; two teachers' values at the same level
compare how well each has learnt that level (same clips, same noise), not how far either is from the floor.

Next to it, a reference that needs no network: the predictor that reads nothing of the clip from ``x_sigma``
but the noise, ``v = (x_sigma - m_c) / sigma`` with ``m_c`` the class's mean clip (from ``MEAN_CLIPS`` other world
clips), whose loss is ``||x0 - m_c||^2 / sigma^2``. A teacher at or above it at some level has learnt nothing there
that the prompt alone does not give. The exact teacher's ``L`` is the floor itself wherever its bank is dense
enough for that level: run it with two bank sizes, and read a level as converged where the two agree (at low
``sigma`` a bank of any size is a nearest-neighbour rule, and its ``L`` falls as the bank grows). One thread; one
JSON line per teacher.
"""

import json
import sys

import torch

from salt_ref.schedule import add_noise, flow_from_eps_x0, sigma_to_t
from toy import video_world as vw
from toy.setup_video import CACHE_DIR, ClassPrompts, SmallVideoConfig, get_teacher, real_teacher

LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
CLIPS, BATCH, MEAN_CLIPS = 256, 64, 20000

torch.set_num_threads(1)
specs = sys.argv[1:]
if not specs:
    raise SystemExit(__doc__.split("\n\n")[0])


def held_out(world: vw.VideoWorldConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluation clips ``x0 [CLIPS, C, F, S, S]``, their labels ``[CLIPS]`` and noise (seed 11)."""
    g = torch.Generator().manual_seed(11)
    x0, labels, _ = vw.sample(CLIPS, g, config=world)
    return x0, labels, torch.randn(x0.shape, generator=g)


def class_mean_loss(world: vw.VideoWorldConfig, x0: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``L(sigma)`` of the reference predictor ``v = (x_sigma - m_c) / sigma`` on the held-out clips ``x0``."""
    bank, bank_labels, _ = vw.sample(MEAN_CLIPS, torch.Generator().manual_seed(12), config=world)
    means = torch.stack([bank[bank_labels == c].mean(0) for c in range(world.n_classes)])
    err = (x0 - means[labels]).pow(2).mean()
    return {str(level): round(float(err / level**2), 5) for level in LEVELS}


for spec in specs:
    try:
        settings = {} if spec == "-" else {k: v for k, v in (item.split("=") for item in spec.split(","))}
        cfg = SmallVideoConfig(**{k: type(getattr(SmallVideoConfig, k))(v) for k, v in settings.items()})
    except (ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"bad teacher spec {spec!r}: {e}") from None
    world = cfg.world_config()
    teacher = real_teacher(cfg, get_teacher(cfg, CACHE_DIR, progress=False))
    prompts = ClassPrompts(world, teacher.config.text_len, teacher.config.text_dim)
    x0, labels, eps = held_out(world)
    context = prompts.embed(labels)
    loss = {}
    with torch.no_grad():
        for level in LEVELS:
            sigma = torch.full((BATCH,), level)
            sq = [
                (teacher(add_noise(x, e, sigma), sigma_to_t(sigma), c) - flow_from_eps_x0(e, x)).pow(2).mean()
                for x, e, c in zip(x0.split(BATCH), eps.split(BATCH), context.split(BATCH), strict=True)
            ]
            loss[str(level)] = round(float(torch.stack(sq).mean()), 5)
    line = {
        "spec": spec,
        "teacher": cfg.teacher_key() if cfg.teacher == "network" else f"exact, {cfg.exact_bank} clips",
        "loss_by_level": loss,
        "class_mean": class_mean_loss(world, x0, labels),
    }
    print(json.dumps(line), flush=True)

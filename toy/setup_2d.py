r"""The 2D toy setup: distil a Gaussian-mixture teacher into a 1-4 step MLP student.

The teacher's flow is exact (``GaussianMixture.flow``), or an MLP fitted to it by flow matching
(``teacher="mlp"``). Student and critic start as copies of an MLP pre-fitted to the teacher's flow by
regression, ``min E ||f(x_sigma, sigma) - v_teacher(x_sigma, sigma)||^2``, as a distilled student starts from
its teacher. Then the shared loop trains one of

    dmd     L = L_DMD                      over mixed 8/4/2-step backward-simulated rollouts
    sc-dmd  L = L_DMD + 0.2 * L_SC         (SC on 8-step draws, never at the last step)
    cd      L = L_CD                       trajectory consistency distillation on a fine teacher grid

and the result is scored against fresh target samples at 1, 2 and 4 steps (see :func:`evaluate`). The numbers
above, the shift of every grid (training, pre-fit, CD, evaluation) and the SC target are the run's
:class:`~salt_ref.recipe.Recipe` (the ``toy`` preset unless given); the loop settings are :func:`toy_loop`'s.
Batches are ``[B, 2]``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from salt_ref.distill import METHODS, DMDObjective, as_flow, consistency_distillation_loss, default_rollout
from salt_ref.loop import LoopConfig, LoopResult, Rng, train
from salt_ref.metrics import rollout_composition_defect
from salt_ref.models.mlp import MLPConfig, TimeMLP
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.sc_dmd import coarse_boundaries
from salt_ref.schedule import add_noise, sample_sigmas
from salt_ref.updates import FlowFn, sample
from toy.gmm import GaussianMixture, make_target
from toy.metrics_2d import evaluate_2d

__all__ = [
    "TOY_LOOP",
    "Toy2DConfig",
    "Toy2DTask",
    "toy_loop",
    "fit_flow",
    "make_teacher",
    "build_init",
    "build_task",
    "evaluate",
    "run",
]

EVAL_STEPS = (1, 2, 4)

# Toy optimisation defaults: the recipe's ratios (5 critic updates, EMA 0.99, clip 10, betas (0, 0.999))
# at learning rates that move a 2D MLP in hundreds rather than thousands of iterations.
TOY_LOOP = {"iters": 1000, "lr_gen": 3e-4, "lr_critic": 1e-3, "ema_start": 100, "ckpt_every": 100, "log_every": 5}


def toy_loop(seed: int = 0, **changes: Any) -> LoopConfig:
    """The loop settings of a toy run (``TOY_LOOP`` with ``changes``), shared by the CLI, benchmark and tutorials."""
    return LoopConfig(**{**TOY_LOOP, "seed": seed, **changes})


@dataclass
class Toy2DConfig:
    """Everything that defines a toy run (the loop's optimisation settings live in ``LoopConfig``)."""

    method: str = "sc-dmd"
    target: str = "ring8"
    teacher: str = "exact"  # "exact" GMM flow, or "mlp" fitted to it
    batch: int = 256
    hidden: int = 256
    depth: int = 3
    recipe: Recipe = field(default_factory=lambda: PRESETS["toy"])
    pretrain_iters: int = 1500
    pretrain_lr: float = 1e-3
    teacher_iters: int = 3000
    cd_steps: int = 64
    eval_samples: int = 2000
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if isinstance(self.recipe, dict):  # read back from a run's JSON
            self.recipe = Recipe.from_dict(self.recipe)
        self.recipe = self.recipe.for_method(self.method)
        if self.teacher not in ("exact", "mlp"):
            raise ValueError(f"unknown teacher {self.teacher!r}; choose 'exact' or 'mlp'")
        if self.batch < 1 or self.pretrain_iters < 0 or self.teacher_iters < 0:
            raise ValueError("batch must be >= 1 and iteration counts >= 0")


def fit_flow(
    model: nn.Module,
    gmm: GaussianMixture,
    iters: int,
    *,
    teacher: FlowFn | None,
    lr: float,
    batch: int,
    shift: float,
    generator: torch.Generator,
) -> nn.Module:
    """Fit ``model``'s flow by regression on ``teacher`` (exact targets) or, if ``None``, by flow matching.

    Levels are drawn half uniform and half warped by ``shift`` so both ends of the schedule are covered.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))
    flow = as_flow(model)
    for _ in range(iters):
        x0 = gmm.sample(batch, generator)
        eps = torch.randn(x0.shape, generator=generator)
        half = batch // 2
        sigma = torch.cat(
            [sample_sigmas(half, generator=generator), sample_sigmas(batch - half, shift=shift, generator=generator)]
        )
        x = add_noise(x0, eps, sigma)
        with torch.no_grad():
            target = teacher(x, sigma) if teacher is not None else eps - x0
        loss = (flow(x, sigma) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(True)


def make_teacher(cfg: Toy2DConfig, gmm: GaussianMixture, generator: torch.Generator) -> FlowFn:
    """The teacher's flow: exact, or a frozen MLP trained by flow matching on target samples."""
    if cfg.teacher == "exact":
        return gmm.flow
    mlp = TimeMLP(MLPConfig(dim=gmm.dim, hidden=cfg.hidden, depth=cfg.depth))
    fit_flow(
        mlp,
        gmm,
        cfg.teacher_iters,
        teacher=None,
        lr=cfg.pretrain_lr,
        batch=cfg.batch,
        shift=cfg.recipe.shift,
        generator=generator,
    )
    return as_flow(mlp.requires_grad_(False).eval())


class Toy2DTask:
    """The loop's ``Task`` for the 2D toy: student, critic and the chosen objective."""

    def __init__(self, cfg: Toy2DConfig, gmm: GaussianMixture, teacher: FlowFn, init: nn.Module):
        self.cfg, self.gmm, self.teacher = cfg, gmm, teacher
        self.generator = copy.deepcopy(init)
        self.critic = copy.deepcopy(init) if cfg.method != "cd" else None
        gen_flow = as_flow(self.generator)
        if cfg.method == "cd":
            self.cd_grid = cfg.recipe.sigmas(cfg.cd_steps)
            return
        self.objective = DMDObjective(
            recipe=cfg.recipe,
            rollout_fn=default_rollout(gen_flow, "renoise"),
            noise_fn=lambda g: torch.randn(cfg.batch, gmm.dim, generator=g),
            real_flow=teacher,
            fake_flow=as_flow(self.critic),
        )

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        if self.cfg.method == "cd":
            x0 = self.gmm.sample(self.cfg.batch, rng.local)
            loss = consistency_distillation_loss(
                as_flow(self.generator), as_flow(ema), self.teacher, x0, self.cd_grid, rng.local
            )
            return loss, {"loss_cd": loss.item(), "loss_gen": loss.item()}
        return self.objective.generator_loss(rng.local, as_flow(ema), it, shared=rng.shared)

    def critic_loss(self, it: int, rng: Rng) -> tuple[Tensor, dict[str, float]]:
        return self.objective.critic_loss(rng.local, shared=rng.shared)


def build_init(cfg: Toy2DConfig, gmm: GaussianMixture, teacher: FlowFn) -> nn.Module:
    """The teacher-initialised MLP every method starts from (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    model = TimeMLP(MLPConfig(dim=gmm.dim, hidden=cfg.hidden, depth=cfg.depth))
    g = torch.Generator().manual_seed(cfg.seed + 10_000)
    return fit_flow(
        model,
        gmm,
        cfg.pretrain_iters,
        teacher=teacher,
        lr=cfg.pretrain_lr,
        batch=cfg.batch,
        shift=cfg.recipe.shift,
        generator=g,
    )


def build_task(cfg: Toy2DConfig, init: nn.Module | None = None) -> Toy2DTask:
    gmm = make_target(cfg.target)
    teacher = make_teacher(cfg, gmm, torch.Generator().manual_seed(cfg.seed + 20_000))
    if init is None:
        init = build_init(cfg, gmm, teacher)
    return Toy2DTask(cfg, gmm, teacher, init)


@torch.no_grad()
def evaluate(
    flow_fn: FlowFn,
    gmm: GaussianMixture,
    recipe: Recipe,
    *,
    n: int = 2000,
    steps: tuple[int, ...] = EVAL_STEPS,
    mode: str = "renoise",
    seed: int = 1234,
) -> tuple[dict[str, dict[str, float]], dict[int, Tensor]]:
    """Metrics per step count (``{"1": {...}, "2": ..., "defect": ...}``) and the samples ``{n: [N, 2]}``.

    The same starting noise and sampler noise are used for every model, so differences are the models'. Every
    grid is ``recipe``'s (its shift; the composition defect on its SC fine list and segments).
    """
    ref = gmm.sample(n, torch.Generator().manual_seed(seed + 1))
    noise = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed))
    results: dict[str, dict[str, float]] = {}
    samples: dict[int, Tensor] = {}
    for k in steps:
        x = sample(flow_fn, noise, recipe.sigmas(k), mode=mode, generator=torch.Generator().manual_seed(seed + 2))
        samples[k] = x
        results[str(k)] = evaluate_2d(x, gmm, ref, generator=torch.Generator().manual_seed(seed + 3))
    fine = recipe.sigmas(recipe.sc_fine_steps)
    results["composition_defect"] = {
        "ddim": rollout_composition_defect(
            flow_fn, noise, fine, coarse_boundaries(fine, recipe.sc_segments), mode="ddim"
        )
    }
    return results, samples


def run(
    cfg: Toy2DConfig,
    loop_cfg: LoopConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init: nn.Module | None = None,
) -> tuple[LoopResult, dict[str, Any]]:
    """Train, evaluate the EMA student, and write ``final_metrics.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    task = build_task(cfg, init if not resume else _placeholder_init(cfg))
    result = train(task, loop_cfg, out_dir, fingerprint={"toy": asdict(cfg)}, resume=resume, progress=progress)
    metrics, samples = evaluate(as_flow(result.ema.eval()), task.gmm, cfg.recipe, n=cfg.eval_samples)
    final = {
        "iterations": result.iterations,
        "method": cfg.method,
        "target": cfg.target,
        "metrics": metrics,
        "last_logs": result.last_logs,
        "recipe": cfg.recipe.to_dict(),
    }
    (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    final["samples"] = samples
    return result, final


def _placeholder_init(cfg: Toy2DConfig) -> nn.Module:
    """On resume the weights come from the checkpoint, so skip the pre-fit and build a bare network."""
    torch.manual_seed(cfg.seed)
    dim = make_target(cfg.target).dim
    return TimeMLP(MLPConfig(dim=dim, hidden=cfg.hidden, depth=cfg.depth))

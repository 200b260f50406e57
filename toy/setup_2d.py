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
from dataclasses import asdict, dataclass, field, replace
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
from salt_ref.schedule import add_noise, sample_sigmas, x0_from_flow
from salt_ref.updates import FlowFn, ddim_update, sample
from toy.gmm import GaussianMixture, make_target
from toy.metrics_2d import METRICS_ABOUT, evaluate_2d

__all__ = [
    "TOY_LOOP",
    "Toy2DConfig",
    "Toy2DTask",
    "Toy2DInit",
    "ode_pairs",
    "fit_ode",
    "bare_init",
    "toy_loop",
    "fit_flow",
    "make_teacher",
    "build_init",
    "build_task",
    "eval_seed",
    "evaluate",
    "references",
    "term_gradients",
    "run",
]

EVAL_STEPS = (1, 2, 4)
EVAL_SEED = 1234
TEACHER_STEPS = 50  # the exact teacher's reference: DDIM with this many steps on the recipe's grid

# Toy optimisation defaults: the recipe's ratios (5 critic updates, EMA 0.99, clip 10, betas (0, 0.999)) at
# learning rates and a budget for a 2D MLP that starts from the ODE init, the base of `python -m toy.sweep_2d`.
TOY_LOOP = {"iters": 300, "lr_gen": 1e-4, "lr_critic": 1e-3, "ema_start": 50, "ckpt_every": 100, "log_every": 5}


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
    pretrain_lr: float = 3e-3
    init: str = "ode"  # the student's start: "ode" regression on teacher ODE pairs, or the "flow" pre-fit
    ode_iters: int = 6000
    ode_pairs: int = 16_384
    ode_grid_steps: int = 64  # the exact teacher's DDIM grid for the pairs (holds every training level)
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
        if self.init not in ("ode", "flow"):
            raise ValueError(f"unknown init {self.init!r}; choose 'ode' or 'flow'")
        if self.teacher not in ("exact", "mlp"):
            raise ValueError(f"unknown teacher {self.teacher!r}; choose 'exact' or 'mlp'")
        if self.batch < 1 or min(self.pretrain_iters, self.teacher_iters, self.ode_iters) < 0 or self.ode_pairs < 1:
            raise ValueError("batch and ode_pairs must be >= 1 and iteration counts >= 0")


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

    def __init__(self, cfg: Toy2DConfig, gmm: GaussianMixture, teacher: FlowFn, init: Toy2DInit):
        self.cfg, self.gmm, self.teacher = cfg, gmm, teacher
        self.generator = copy.deepcopy(init.student if cfg.method != "cd" else init.critic)
        self.critic = copy.deepcopy(init.critic) if cfg.method != "cd" else None
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


@dataclass
class Toy2DInit:
    """Where training starts: the ``student`` (ODE- or flow-initialised) and the ``critic`` (the teacher's fit)."""

    student: nn.Module
    critic: nn.Module


@torch.no_grad()
def ode_pairs(teacher: FlowFn, noise: Tensor, grid: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's DDIM path along ``grid [S + 1]`` from ``noise [N, D]``: states at ``levels [K]`` ``[N, K, D]``
    and endpoints ``[N, D]``. Every level must be a point of the grid."""
    idx = [int(torch.argmin((grid - lv).abs())) for lv in levels.tolist()]
    if any(abs(float(grid[i]) - lv) > 1e-6 for i, lv in zip(idx, levels.tolist(), strict=True)):
        raise ValueError(f"ODE levels {levels.tolist()} are not all on the {grid.numel() - 1}-step grid")
    x, states = noise, {}
    for i in range(grid.numel() - 1):
        states[i] = x
        sigma = grid[i].expand(x.shape[0])
        x = ddim_update(x, sigma, grid[i + 1], teacher(x, sigma))
    return torch.stack([states[i] for i in idx], dim=1), x


def fit_ode(model: nn.Module, teacher: FlowFn, cfg: Toy2DConfig, dim: int, generator: torch.Generator) -> nn.Module:
    """ODE initialisation (as Self-Forcing's at video scale): regress the student's endpoint at the teacher's ODE
    states onto the ODE's own endpoint, at every level of the recipe's training lists,

        min E_{z, sigma_j} || x0_theta(x_j, sigma_j) - Phi(z) ||^2,     x_j = the ODE state of z at sigma_j,

    so the student maps each noise to the mode the teacher's ODE sends it to (the teacher's mode shares) before
    DMD sharpens it. ``cfg.ode_pairs`` paths on the ``cfg.ode_grid_steps`` grid, ``cfg.ode_iters`` steps.
    """
    r = cfg.recipe
    levels = sorted({float(v) for n in r.steps for v in r.sigmas(n)[:-1]}, reverse=True)
    levels_t = torch.tensor(levels)
    noise = torch.randn(cfg.ode_pairs, dim, generator=generator)
    states, endpoint = ode_pairs(teacher, noise, r.sigmas(cfg.ode_grid_steps), levels_t)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.ode_iters, 1))
    flow = as_flow(model)
    for _ in range(cfg.ode_iters):
        i = torch.randint(cfg.ode_pairs, (cfg.batch,), generator=generator)
        j = torch.randint(len(levels), (cfg.batch,), generator=generator)
        x, sigma = states[i, j], levels_t[j]
        loss = (x0_from_flow(x, sigma, flow(x, sigma)) - endpoint[i]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(True)


def build_init(cfg: Toy2DConfig, gmm: GaussianMixture, teacher: FlowFn) -> Toy2DInit:
    """Every method's start for seed ``cfg.seed``: an MLP pre-fitted to the teacher's flow (the critic's start,
    as the fake score starts from the teacher), and the student: that fit, then ODE-initialised if
    ``cfg.init == "ode"``."""
    torch.manual_seed(cfg.seed)
    model = TimeMLP(MLPConfig(dim=gmm.dim, hidden=cfg.hidden, depth=cfg.depth))
    g = torch.Generator().manual_seed(cfg.seed + 10_000)
    critic = fit_flow(
        model,
        gmm,
        cfg.pretrain_iters,
        teacher=teacher,
        lr=cfg.pretrain_lr,
        batch=cfg.batch,
        shift=cfg.recipe.shift,
        generator=g,
    )
    student = copy.deepcopy(critic)
    if cfg.init == "ode" and cfg.method != "cd":  # CD distils the teacher's flow itself: it starts from the fit
        fit_ode(student, teacher, cfg, gmm.dim, torch.Generator().manual_seed(cfg.seed + 30_000))
    return Toy2DInit(student, critic)


def build_task(cfg: Toy2DConfig, init: Toy2DInit | None = None) -> Toy2DTask:
    """The loop's task for ``cfg`` (the init is built unless given)."""
    gmm = make_target(cfg.target)
    teacher = make_teacher(cfg, gmm, torch.Generator().manual_seed(cfg.seed + 20_000))
    if init is None:
        init = build_init(cfg, gmm, teacher)
    return Toy2DTask(cfg, gmm, teacher, init)


def eval_seed(seed: int) -> int:
    """The evaluation draw of run seed ``seed``: every seed its own reference set and noise, shared by every
    method of that seed (paired), so a spread over seeds includes the evaluation's own noise."""
    return EVAL_SEED + 7919 * seed


@torch.no_grad()
def evaluate(
    flow_fn: FlowFn,
    gmm: GaussianMixture,
    recipe: Recipe,
    *,
    n: int = 2000,
    n_modes: int = 20_000,
    steps: tuple[int, ...] = EVAL_STEPS,
    mode: str = "renoise",
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[int, Tensor]]:
    """Metrics per step count (``{"1": {...}, "2": ..., "composition_defect": ...}``) and samples ``{k: [N, D]}``.

    ``n_modes`` samples are drawn from noise of :func:`eval_seed` (``seed``), the distances use their first ``n``
    against ``n`` fresh target samples, the mode metrics use all (see ``toy.metrics_2d.evaluate_2d``). Every model
    evaluated with one ``seed`` sees the same noise, so differences are the models'. Every grid is ``recipe``'s
    (its shift; the composition defect on its SC fine list and segments, DDIM, first ``n`` noises).
    """
    base = eval_seed(seed)
    ref = gmm.sample(n, torch.Generator().manual_seed(base + 1))
    noise = torch.randn(max(n, n_modes), gmm.dim, generator=torch.Generator().manual_seed(base))
    results: dict[str, dict[str, float]] = {}
    samples: dict[int, Tensor] = {}
    for k in steps:
        x = sample(flow_fn, noise, recipe.sigmas(k), mode=mode, generator=torch.Generator().manual_seed(base + 2))
        samples[k] = x
        results[str(k)] = evaluate_2d(x, gmm, ref, generator=torch.Generator().manual_seed(base + 3))
    fine = recipe.sigmas(recipe.sc_fine_steps)
    results["composition_defect"] = {
        "ddim": rollout_composition_defect(
            flow_fn, noise[:n], fine, coarse_boundaries(fine, recipe.sc_segments), mode="ddim"
        )
    }
    return results, samples


@torch.no_grad()
def references(
    gmm: GaussianMixture, recipe: Recipe, *, n: int = 2000, n_modes: int = 20_000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """What a student is measured against, on :func:`evaluate`'s draw of ``seed``.

    ``teacher``: the exact flow sampled with :data:`TEACHER_STEPS` DDIM steps (DDIM: the re-noise sampler with the
    exact flow is biased, its re-noised posterior means are not samples). ``data``: fresh target samples scored
    like a model, the finite-sample floor of every metric.
    """
    teacher, _ = evaluate(gmm.flow, gmm, recipe, n=n, n_modes=n_modes, steps=(TEACHER_STEPS,), mode="ddim", seed=seed)
    base = eval_seed(seed)
    data = gmm.sample(max(n, n_modes), torch.Generator().manual_seed(base + 4))
    ref = gmm.sample(n, torch.Generator().manual_seed(base + 1))
    floor = evaluate_2d(data, gmm, ref, generator=torch.Generator().manual_seed(base + 3))
    return {"teacher": teacher[str(TEACHER_STEPS)] | {"steps": TEACHER_STEPS,
                                                      "composition_defect": teacher["composition_defect"]["ddim"]},
            "data": floor}  # fmt: skip


def term_gradients(task: Toy2DTask, *, draws: int = 32, seed: int = 0) -> dict[str, float]:
    r"""How hard each generator term pulls on the student's weights ``theta``, where the SC term is taken.

    A loss's value does not say that: ``L_DMD = 0.5 mean((x0 - sg(x0 - g))^2)`` equals ``0.5 mean(g^2)`` whatever
    direction ``g`` has, and ``L_SC = (1 - s)(m - e)^2 mean((v1 - v2)^2)`` is small where its gradient
    ``2 (1 - s)(m - e)^2 (v1 - v2) / N`` need not be small relative to DMD's. So, on ``draws`` draws of the task's
    recipe that take the SC term (8-step lists, exits ``0 < k < 7``: at ``k = 0`` its weight ``1 - s`` is 0),
    with the same noise for both, this returns the medians over draws of

        dmd     ||grad_theta L_DMD||
        sc      ||grad_theta L_SC||          (lambda = 1: the SC term's pull per unit weight)
        ratio   ||grad L_DMD|| / ||grad L_SC||   the lambda at which both terms pull equally hard
        cos     cos(grad L_DMD, grad L_SC)

    The two gradients are taken by differencing ``L_DMD + 1 * L_SC`` and ``L_DMD`` on one draw. Leaves the
    student's ``.grad`` cleared."""
    if task.cfg.method == "cd":
        raise ValueError("term_gradients needs a DMD-family task (dmd or sc-dmd), not cd")
    obj = task.objective
    terms = {w: replace(obj, recipe=obj.recipe.replace(sc_weight=w)) for w in (0.0, 1.0)}
    params = [p for p in task.generator.parameters() if p.requires_grad]
    shared = torch.Generator().manual_seed(seed)
    local = torch.Generator().manual_seed(seed + 1)
    rows: list[tuple[float, float, float]] = []
    while len(rows) < draws:
        draw = terms[1.0].draw(0, shared)
        if draw.sc_points is None or draw.exit_index == 0:
            continue
        state = local.get_state()
        flat = {}
        for w, objective in terms.items():
            local.set_state(state)  # both losses see one rollout, one re-noising draw
            for p in params:
                p.grad = None
            objective.loss(draw, local)[0].backward()
            flat[w] = torch.cat([p.grad.flatten() for p in params])
        torch.randn(1, generator=local)  # not needed (the second pass already moved past this draw); kept: the
        # published pull tables were drawn with it
        g_dmd, g_sc = flat[0.0], flat[1.0] - flat[0.0]
        n_dmd, n_sc = float(g_dmd.norm()), float(g_sc.norm())
        rows.append((n_dmd, n_sc, float(g_dmd @ g_sc) / max(n_dmd * n_sc, 1e-30)))
    for p in params:
        p.grad = None
    med = torch.tensor(rows).median(dim=0).values.tolist()
    ratio = torch.tensor([a / max(b, 1e-30) for a, b, _ in rows]).median().item()
    return {"dmd": med[0], "sc": med[1], "ratio": ratio, "cos": med[2], "draws": float(draws)}


def run(
    cfg: Toy2DConfig,
    loop_cfg: LoopConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init: Toy2DInit | None = None,
    with_references: bool = True,
) -> tuple[LoopResult, dict[str, Any]]:
    """Train, evaluate the EMA student, and write ``final_metrics.json`` into ``out_dir``.

    ``with_references`` adds :func:`references` (the exact teacher and the data floor on the same evaluation
    draw; a benchmark computes them once per seed instead)."""
    out_dir = Path(out_dir)
    task = build_task(cfg, init if not resume else bare_init(cfg))
    from toy.gmm import target_fingerprint

    # a mixture file's contents, not only its path: a file edited between a run and its --resume is another target
    # (presets have no file: their fingerprint stays as it was, so their earlier runs still resume)
    fingerprint: dict[str, Any] = {"toy": asdict(cfg)}
    if (sha := target_fingerprint(cfg.target)) is not None:
        fingerprint["target_sha256"] = sha
    result = train(task, loop_cfg, out_dir, fingerprint=fingerprint, resume=resume, progress=progress)
    metrics, samples = evaluate(as_flow(result.ema.eval()), task.gmm, cfg.recipe, n=cfg.eval_samples, seed=cfg.seed)
    final = {
        "iterations": result.iterations,
        "method": cfg.method,
        "target": cfg.target,
        "metrics": metrics,
        "about": METRICS_ABOUT,
        "last_logs": result.last_logs,
        "recipe": cfg.recipe.to_dict(),
    }
    if with_references:
        final["reference"] = references(task.gmm, cfg.recipe, n=cfg.eval_samples, seed=cfg.seed)
    (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    final["samples"] = samples
    return result, final


def bare_init(cfg: Toy2DConfig) -> Toy2DInit:
    """Untrained networks of ``cfg``'s shape, for weights loaded afterwards (a resume, a cached init)."""
    torch.manual_seed(cfg.seed)
    dim = make_target(cfg.target).dim
    bare = TimeMLP(MLPConfig(dim=dim, hidden=cfg.hidden, depth=cfg.depth))
    return Toy2DInit(bare, copy.deepcopy(bare))

r"""Few-step distillation objectives built from the core maths: DMD, SC-DMD, Salt, consistency distillation.

One generator iteration of DMD / SC-DMD (Self-Forcing backward simulation over mixed step lists):

    (n, k) ~ Recipe.draw_step_list      n in {8, 4, 2} w.p. {0.4, 0.4, 0.2}; exit index k ~ U{0..n-1}
    x0 = rollout(G, eps, sigmas, exit=k)            steps < k without gradient, step k with gradient
    L  = L_DMD(x0) + lambda * L_SC(x_k, sigma_k, v_k)   (SC only for n = 8 and k < 7; lambda = 0.2)

The critic sees a fresh no-grad rollout drawn the same way and fits it by flow matching (``dmd.critic_loss``).
Salt adds, on 2-step draws exiting at step 1 (after a start iteration), ``0.1 * L_align(x0, x0_ref)`` where the
chunk-wise rollout also ran its high-quality reference path (``salt_ref.cache_condition``,
``salt_ref.feature_align``). The SC target is built at the exit step through the rollout's ``on_exit`` hook so
that a chunk-wise rollout evaluates ``v2`` with that chunk's KV cache. Every number above is the
:class:`~salt_ref.recipe.Recipe`'s (the defaults shown); :meth:`DMDObjective.plan` is the one place that decides
which terms a draw ``(n, k, iteration)`` takes.

Consistency distillation (the trajectory baseline the paper contrasts with), on a fine grid
``tau_0 = 1 > ... > tau_N = 0``: from data ``x0``, ``x_{n} = add_noise(x0, eps, tau_n)``, one teacher DDIM step
to ``x_{n+1}``, and ``L_CD = mean((f(x_n, tau_n) - sg(f^-(x_{n+1}, tau_{n+1})))^2)`` with ``f = x - tau v``
(the endpoint) and ``f^-`` the EMA student; ``f(x, 0) = x`` holds by construction.

Everything here is shape-agnostic (``[B, 2]`` or ``[B, C, F, H, W]``): the rollout is a callable so the video
setups can pass a chunk-wise rollout with a KV cache, and networks are ``FlowFn``s closed over their condition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from salt_ref import dmd, feature_align, sc_dmd
from salt_ref.recipe import Recipe
from salt_ref.schedule import add_noise, randn_like, sigma_to_t, x0_from_flow
from salt_ref.updates import FlowFn, OnExit, Rollout, ddim_update, rollout

__all__ = [
    "as_flow",
    "Draw",
    "RolloutFn",
    "DMDObjective",
    "default_rollout",
    "consistency_distillation_loss",
    "METHODS",
]

METHODS = ("dmd", "sc-dmd", "cd")

RolloutFn = Callable[..., Rollout]
"""``rollout_fn(noise, sigmas, *, exit_index, generator, grad_exit) -> Rollout`` for the generator."""


def as_flow(model: nn.Module, **condition: Tensor) -> FlowFn:
    """Wrap a network ``model(x, t, **condition)`` taking ``t = 1000 sigma`` as a ``flow_fn(x, sigma)``."""

    def flow_fn(x: Tensor, sigma: Tensor) -> Tensor:
        return model(x, sigma_to_t(sigma), **condition)

    return flow_fn


@dataclass(frozen=True)
class Draw:
    """One iteration's shared choices and the loss terms they switch on.

    Attributes:
        n_steps: the step list drawn; ``sigmas [n + 1]`` its levels; ``exit_index`` the exit step ``k``.
        sc_points: ``(sigma_e, sigma_m)`` of the SC term, or ``None`` when the SC term is not taken.
        align: whether the cache-conditioned alignment (and its reference path) is taken.
    """

    n_steps: int
    sigmas: Tensor
    exit_index: int
    sc_points: tuple[float, float] | None
    align: bool


@dataclass
class DMDObjective:
    """DMD, SC-DMD or Salt generator and critic losses, as the ``recipe`` switches the terms.

    Attributes:
        recipe: the method's settings (step lists, shift, DMD levels, SC and alignment terms).
        rollout_fn: the generator's rollout (``rollout_fn(noise, sigmas, *, exit_index, generator, grad_exit,
            on_exit, reference_sigmas)``).
        noise_fn: ``noise_fn(generator) -> eps [B, ...]`` starting noise for one rollout.
        real_flow: the teacher with CFG folded in; ``fake_flow``: the critic.
        feature_fn, frames: cache-aware alignment (Salt): ``feature_fn(x, sigma)`` taps the frozen teacher's hidden
            states of videos with ``frames`` latent frames (see ``salt_ref.feature_align``).
    """

    recipe: Recipe
    rollout_fn: RolloutFn
    noise_fn: Callable[[torch.Generator | None], Tensor]
    real_flow: FlowFn
    fake_flow: FlowFn
    feature_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    frames: int = 1

    def __post_init__(self) -> None:
        if self.recipe.align_on and self.feature_fn is None:
            raise ValueError("cache-aware alignment needs a feature_fn (the frozen teacher's hidden states)")

    def plan(self, n_steps: int, exit_index: int, it: int, shared: torch.Generator | None = None) -> Draw:
        """The terms of a draw of list ``n_steps`` exiting at ``exit_index`` at iteration ``it``."""
        r = self.recipe
        sigmas = r.sigmas(n_steps)
        sc = None
        if n_steps == r.sc_fine_steps:
            # drawn even when the SC term is off, so DMD and SC-DMD runs with one seed see the same lists,
            # exits and noise (common random numbers): their difference is the loss, not the luck of the draw
            points = sc_dmd.sc_points(sigmas, exit_index, n_segments=r.sc_segments, generator=shared)
            if points is not None and r.sc_on:
                sc = points
        align = r.align_on and it >= r.align_start and (n_steps, exit_index) == (r.align_steps, r.align_exit)
        return Draw(n_steps, sigmas, exit_index, sc, align)

    def draw(self, it: int, shared: torch.Generator | None = None) -> Draw:
        """Draw the step list and exit from ``shared`` and :meth:`plan` their terms."""
        n, k = self.recipe.draw_step_list(shared)
        return self.plan(n, k, it, shared)

    def generator_loss(
        self,
        generator: torch.Generator | None = None,
        ema_flow: FlowFn | None = None,
        it: int = 0,
        shared: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """One micro-batch's generator loss and logs. ``shared`` (default ``generator``) draws the choices that
        every rank makes alike: step list, exit step and SC points."""
        return self.loss(self.draw(it, shared or generator), generator, ema_flow)

    def loss(
        self, draw: Draw, generator: torch.Generator | None = None, ema_flow: FlowFn | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The generator loss of one :class:`Draw`: ``L_DMD`` plus the terms it switches on."""
        r = self.recipe
        on_exit: OnExit | None = None
        sigma_e = 0.0
        if draw.sc_points is not None:
            sigma_e, sigma_m = draw.sc_points
            target = ema_flow if r.sc_target == "ema" and ema_flow is not None else None

            def on_exit(flow: FlowFn, x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
                return sc_dmd.sc_target(target or flow, x, sigma, v, sigma_m, sigma_e)

        extra = {"reference_sigmas": r.sigmas(r.align_reference_steps)} if draw.align else {}
        ro = self.rollout_fn(
            self.noise_fn(generator),
            draw.sigmas,
            exit_index=draw.exit_index,
            generator=generator,
            on_exit=on_exit,
            **extra,
        )
        out = dmd.dmd_generator_loss(
            ro.x0,
            self.real_flow,
            self.fake_flow,
            shift=r.shift,
            sigma_min=r.dmd_sigma_min,
            sigma_max=r.dmd_sigma_max,
            generator=generator,
            normalizer=r.dmd_normalizer,
        )
        loss, logs = out.loss, {"loss_dmd": out.loss.item(), "n_steps": draw.n_steps, "exit": draw.exit_index}
        if ro.exit_extra is not None:
            l_sc = sc_dmd.sc_loss_from_target(ro.x_exit, ro.sigma_exit, ro.v_exit, ro.exit_extra, sigma_e)
            loss = loss + r.sc_weight * l_sc
            logs["loss_sc"] = l_sc.item()
        if draw.align:
            l_align = feature_align.alignment_loss(
                self.feature_fn,
                ro.x0,
                ro.x0_ref,
                frames=self.frames,
                shift=r.shift,
                margin=r.align_margin,
                t_max=r.align_t_max,
                generator=generator,
            )
            loss = loss + r.align_weight * l_align
            logs["loss_align"] = l_align.item()
        logs["loss_gen"] = loss.item()
        return loss, logs

    def critic_loss(
        self, generator: torch.Generator | None = None, shared: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        r = self.recipe
        n, k = r.draw_step_list(shared or generator)
        with torch.no_grad():
            noise = self.noise_fn(generator)
            x0 = self.rollout_fn(noise, r.sigmas(n), exit_index=k, generator=generator, grad_exit=False).x0
        loss = dmd.critic_loss(
            self.fake_flow, x0, shift=r.shift, sigma_min=r.dmd_sigma_min, sigma_max=r.dmd_sigma_max, generator=generator
        )
        return loss, {"loss_critic": loss.item()}


def default_rollout(gen_flow: FlowFn, mode: str = "renoise") -> RolloutFn:
    """The plain (non-chunked) rollout of ``gen_flow`` as a ``RolloutFn``."""

    def rollout_fn(
        noise: Tensor,
        sigmas: Tensor,
        *,
        exit_index: int | None = None,
        generator: torch.Generator | None = None,
        grad_exit: bool = True,
        on_exit: OnExit | None = None,
    ) -> Rollout:
        return rollout(
            gen_flow,
            noise,
            sigmas,
            mode=mode,
            generator=generator,
            exit_index=exit_index,
            grad_exit=grad_exit,
            on_exit=on_exit,
        )

    return rollout_fn


def consistency_distillation_loss(
    student_flow: FlowFn,
    target_flow: FlowFn,
    teacher_flow: FlowFn,
    x0: Tensor,
    grid: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Trajectory consistency distillation on adjacent points of ``grid [N + 1]`` (decreasing, ends at 0).

    Per sample a grid index n is drawn; ``x_n`` is data noised to ``tau_n``; the teacher takes one DDIM step to
    ``tau_{n+1}``; the student's endpoint at ``x_n`` is pulled to the target network's endpoint at ``x_{n+1}``.
    """
    batch = x0.shape[0]
    idx = torch.randint(grid.numel() - 1, (batch,), generator=generator)
    tau_n, tau_next = grid[idx].to(x0), grid[idx + 1].to(x0)
    eps = randn_like(x0, generator)
    x_n = add_noise(x0, eps, tau_n)
    with torch.no_grad():
        x_next = ddim_update(x_n, tau_n, tau_next, teacher_flow(x_n, tau_n))
        target = x0_from_flow(x_next, tau_next, target_flow(x_next, tau_next))
    pred = x0_from_flow(x_n, tau_n, student_flow(x_n, tau_n))
    return (pred - target).pow(2).mean()

r"""Denoising updates ``x_t -> x_s`` (``s < t``) and the rollouts that compose them.

A generator ``G`` predicts the flow ``v = G(x_t, t)``; its endpoint is ``x0_hat = x_t - t * v``
(``t`` is the noise level sigma here). Three updates take the state to a lower level ``s``:

    re-noise (stochastic, DMD / consistency sampler):  x_s = (1 - s) * x0_hat + s * eps'      (fresh eps')
    DDIM / Euler (deterministic ODE step):              eps_hat = (x_t - (1 - t) * x0_hat) / t
                                                        x_s = (1 - s) * x0_hat + s * eps_hat = x_t - (t - s) * v
    ancestral (DDPM posterior q(x_s | x_t, x0_hat)):    r = (1 - t) s / ((1 - s) t)            (0 <= r <= 1)
                                                        x_s = (1 - s) * x0_hat + s * (r eps_hat + sqrt(1 - r^2) eps')

The second form of DDIM is exact algebra (and defined at ``t = 0``), so ``update(t -> t)`` is the identity,
and re-noising at ``s = 0`` returns the endpoint ``x0_hat``. The ancestral step keeps the part ``r`` of the noise
estimate that the posterior keeps and draws the rest fresh: ``r = 1`` at ``s = t`` (identity), ``r = 0`` at ``s = 0``
(the endpoint) and at ``t = 1``. With the exact flow and small steps it samples the data's noised marginals, as
DDIM does; re-noising does not: it drops the posterior's spread around ``x0_hat`` (for Gaussian data it ends with
about half the data's variance at any number of steps; ``tests/test_properties.py``). It is the stochastic
sampler of score-based methods: what DMD matches is the distribution the teacher's scores describe, which for an
imperfect network is nearer its ancestral samples than its DDIM ones (``scripts/teacher_look.py --sampler``).

A rollout composes K updates along ``sigmas = [s_0 > s_1 > ... > s_K]`` and keeps every visited state and
endpoint. With ``exit_index = k`` it is the Self-Forcing *backward simulation*: steps ``0..k-1`` run without
gradient, step ``k`` is evaluated with gradient and the rollout stops there, returning ``x0_hat_k``.

Every sampler here has the k-diffusion signature ``(flow_fn, x, sigmas, ...)``, where
``flow_fn(x [B, ...], sigma [B]) -> v [B, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from salt_ref.schedule import append_dims, eps_from_flow, randn_like, x0_from_flow

__all__ = [
    "FlowFn",
    "OnExit",
    "renoise_update",
    "ddim_update",
    "ancestral_update",
    "update",
    "Rollout",
    "rollout",
    "sample",
]

FlowFn = Callable[[Tensor, Tensor], Tensor]
"""``flow_fn(x [B, ...], sigma [B]) -> v [B, ...]``: a network closed over its condition."""

OnExit = Callable[[FlowFn, Tensor, Tensor, Tensor], Tensor]
"""``on_exit(flow_fn, x_exit, sigma_exit [B], v_exit) -> Tensor``: work done at a rollout's exit step."""

MODES = ("renoise", "ddim", "ancestral")


def renoise_update(x0_hat: Tensor, sigma_s: Tensor | float, noise: Tensor) -> Tensor:
    """Stochastic update ``x_s = (1 - s) x0_hat + s eps'``; ``noise`` is the fresh ``eps'``."""
    s = append_dims(sigma_s, x0_hat)
    return (1 - s) * x0_hat + s * noise


def ddim_update(x_t: Tensor, sigma_t: Tensor | float, sigma_s: Tensor | float, v: Tensor) -> Tensor:
    """Deterministic DDIM update ``x_s = x_t - (t - s) v`` (equal to re-noising with ``eps_hat``)."""
    return x_t - (append_dims(sigma_t, x_t) - append_dims(sigma_s, x_t)) * v


def ancestral_update(x_t: Tensor, sigma_t: Tensor | float, sigma_s: Tensor | float, v: Tensor, noise: Tensor) -> Tensor:
    """Ancestral (DDPM posterior) update ``x_s = (1 - s) x0_hat + s (r eps_hat + sqrt(1 - r^2) eps')``.

    ``r = (1 - t) s / ((1 - s) t)`` (module docstring); ``noise`` is the fresh ``eps'``. The steps ``t -> t`` and
    ``0 -> 0``, where ``r`` is 0 / 0, are the identity (``r = 1``).
    """
    x0_hat, eps_hat = x0_from_flow(x_t, sigma_t, v), eps_from_flow(x_t, sigma_t, v)
    t, s = append_dims(sigma_t, x_t), append_dims(sigma_s, x_t)
    num, den = (1 - t) * s, (1 - s) * t
    r = torch.where(den > 0, num / den.clamp_min(torch.finfo(x_t.dtype).tiny), torch.ones_like(den)).clamp(0, 1)
    return (1 - s) * x0_hat + s * (r * eps_hat + (1 - r * r).sqrt() * noise)


def update(
    x_t: Tensor,
    sigma_t: Tensor | float,
    sigma_s: Tensor | float,
    v: Tensor,
    *,
    mode: str = "ddim",
    noise: Tensor | None = None,
) -> Tensor:
    """One update ``x_t -> x_s`` given the flow ``v`` at ``(x_t, t)``; ``mode`` is ``ddim``, ``renoise`` or
    ``ancestral`` (the last two need the fresh ``noise``)."""
    if mode == "ddim":
        return ddim_update(x_t, sigma_t, sigma_s, v)
    if mode in ("renoise", "ancestral") and noise is None:
        raise ValueError(f"mode={mode!r} needs a fresh noise tensor")
    if mode == "renoise":
        return renoise_update(x0_from_flow(x_t, sigma_t, v), sigma_s, noise)
    if mode == "ancestral":
        return ancestral_update(x_t, sigma_t, sigma_s, v, noise)
    raise ValueError(f"unknown update mode {mode!r}; choose one of {MODES}")


@dataclass
class Rollout:
    """What a rollout visited.

    Attributes:
        states: ``states[k]`` is the state at ``sigmas[k]``, each ``[B, ...]``.
        x0s: ``x0s[k]`` is the endpoint predicted at ``states[k]``.
        sigmas: the step list that was followed, ``[K + 1]``.
        exit_index: index of the last evaluated step (``K - 1`` for a full rollout).
        v_exit: the flow at the exit step (carries gradient when the exit step did).
        exit_extra: what ``on_exit`` returned (e.g. SC-DMD's two-jump target), or ``None``.
        x0_ref: a reference path's output when the rollout ran one (cache-aware training), else ``None``.
    """

    states: list[Tensor]
    x0s: list[Tensor]
    sigmas: Tensor
    exit_index: int
    v_exit: Tensor
    exit_extra: Tensor | None = None
    x0_ref: Tensor | None = None

    @property
    def x0(self) -> Tensor:
        """The output: the endpoint predicted at the exit step ``[B, ...]``."""
        return self.x0s[self.exit_index]

    @property
    def x_exit(self) -> Tensor:
        """The state the exit step was evaluated at ``[B, ...]``."""
        return self.states[self.exit_index]

    @property
    def sigma_exit(self) -> float:
        return float(self.sigmas[self.exit_index])


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-d list of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError(f"sigmas must be non-increasing, got {sigmas.tolist()}")


def rollout(
    flow_fn: FlowFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    mode: str = "renoise",
    generator: torch.Generator | None = None,
    exit_index: int | None = None,
    grad_exit: bool = True,
    on_exit: OnExit | None = None,
) -> Rollout:
    """Compose updates from ``x [B, ...]`` at ``sigmas[0]`` along ``sigmas [K + 1]``.

    Args:
        flow_fn: the generator, ``(x, sigma [B]) -> v``.
        x: the starting state at level ``sigmas[0]`` (pure noise when ``sigmas[0] == 1``).
        sigmas: decreasing levels; the last is the level the final update lands on (usually 0).
        mode: ``"renoise"`` or ``"ancestral"`` (fresh noise drawn from ``generator``), or ``"ddim"``.
        exit_index: stop after evaluating step ``k`` (backward simulation); ``None`` runs all K steps.
        grad_exit: evaluate the exit step with gradient (earlier steps never carry gradient).
        on_exit: ``on_exit(flow_fn, x_exit, sigma_exit [B], v_exit)`` evaluated without gradient at the exit
            step, while ``flow_fn`` still sees the exit step's context (chunk-wise rollouts pass their KV cache).
    """
    _check_sigmas(sigmas)
    n_steps = sigmas.numel() - 1
    k_exit = n_steps - 1 if exit_index is None else exit_index
    if not 0 <= k_exit < n_steps:
        raise ValueError(f"exit_index must be in [0, {n_steps}), got {exit_index}")
    if mode not in MODES:
        raise ValueError(f"unknown update mode {mode!r}; choose one of {MODES}")
    batch = x.shape[0]
    states, x0s = [], []
    for k in range(k_exit + 1):
        sigma_t = sigmas[k].to(x).expand(batch)
        with torch.set_grad_enabled(grad_exit and k == k_exit and torch.is_grad_enabled()):
            v = flow_fn(x, sigma_t)
            x0_hat = x0_from_flow(x, sigma_t, v)
        states.append(x)
        x0s.append(x0_hat)
        if k == k_exit:
            extra = None
            if on_exit is not None:
                with torch.no_grad():
                    extra = on_exit(flow_fn, x, sigma_t, v)
            return Rollout(states, x0s, sigmas, k_exit, v, extra)
        noise = randn_like(x, generator) if mode != "ddim" else None
        x = update(x, sigma_t, sigmas[k + 1].to(x), v, mode=mode, noise=noise).detach()
    raise AssertionError("unreachable")


@torch.no_grad()
def sample(
    flow_fn: FlowFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    mode: str = "renoise",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate ``[B, ...]`` from ``noise`` by a full rollout; returns the last endpoint ``x0_hat``."""
    return rollout(flow_fn, noise, sigmas, mode=mode, generator=generator, grad_exit=False).x0

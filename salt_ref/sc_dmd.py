r"""SC-DMD's endpoint-consistency regulariser (the authors' code calls it SCFM).

At the exit step of a rollout the student sits at state ``x_s`` on level ``sigma_s`` (``s`` below). Pick an
endpoint level ``sigma_e`` (a coarse-grid boundary at least one fine step below) and a midpoint ``sigma_m``
(a fine-grid point strictly between). Then

    v1     = v_theta(x_s, s)                                   with gradient
    x_m    = x_s - (s - m) * sg(v1)                            (DDIM jump with the detached first velocity)
    v2     = v_target(x_m, m)                                  no gradient (the live student, or an EMA copy)
    pred   = x_s - (s - e) * v1                                (one jump s -> e)
    target = x_m - (m - e) * v2                                (two composed jumps s -> m -> e), all sg
    L_SC   = (1 - s) * mean((pred - target)^2)

Substituting, ``pred - target = (m - e)(v1 - v2)`` in value, so ``L_SC = (1 - s)(m - e)^2 mean((v1 - v2)^2)``:
zero exactly when the student's velocity is constant along its own path, and its gradient pulls ``v1`` towards
the step-weighted average ``[(s - m) sg(v1) + (m - e) v2] / (s - e)``. SC-DMD = DMD + lambda * L_SC, lambda = 0.2.

The target is built in :func:`sc_target` under ``torch.no_grad`` so the stop-gradient is structural.
Shapes: ``x_s, v1 [B, ...]``; ``sigma_s`` a float or ``[B]``; ``sigma_m``, ``sigma_e`` floats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salt_ref.schedule import append_dims
from salt_ref.updates import FlowFn

__all__ = ["SC_LAMBDA", "SC_SEGMENTS", "coarse_boundaries", "sc_points", "sc_target", "sc_loss", "sc_loss_from_target"]

SC_LAMBDA = 0.2
SC_SEGMENTS = 4  # coarse segments of the fine list: the 4-step inference grid


def coarse_boundaries(fine_sigmas: Tensor, n_segments: int = SC_SEGMENTS) -> list[float]:
    """Segment boundaries of a fine list ``[L + 1]`` (terminal 0 included): ``steps[j L / n]`` for j < n, then 0.

    For the warped 8-step list these are the 4-step inference grid ``[1, .9375, .8333, .625]`` plus 0.
    """
    n_fine = fine_sigmas.numel() - 1
    if n_fine % n_segments:
        raise ValueError(f"a {n_fine}-step list cannot be cut into {n_segments} equal segments")
    stride = n_fine // n_segments
    return [float(fine_sigmas[j * stride]) for j in range(n_segments)] + [0.0]


def sc_points(
    fine_sigmas: Tensor,
    exit_index: int,
    *,
    n_segments: int = SC_SEGMENTS,
    generator: torch.Generator | None = None,
) -> tuple[float, float] | None:
    """Draw ``(sigma_e, sigma_m)`` for an exit at ``fine_sigmas[exit_index]``, or ``None`` at the last step.

    ``sigma_e`` is one of the two highest coarse boundaries lying strictly below ``fine_sigmas[exit_index + 1]``;
    ``sigma_m`` is a fine grid point strictly between ``sigma_e`` and ``sigma_s``.
    """
    n_fine = fine_sigmas.numel() - 1
    if not 0 <= exit_index < n_fine:
        raise ValueError(f"exit_index must be in [0, {n_fine}), got {exit_index}")
    if exit_index == n_fine - 1:
        return None  # no fine step below the last one: the SC term is never taken there
    sigma_s = float(fine_sigmas[exit_index])
    below = float(fine_sigmas[exit_index + 1])
    candidates = sorted((b for b in coarse_boundaries(fine_sigmas, n_segments) if b < below), reverse=True)[:2]
    pick = int(torch.randint(len(candidates), (1,), generator=generator))
    sigma_e = candidates[pick]
    mids = [float(p) for p in fine_sigmas[1:] if sigma_e < float(p) < sigma_s]
    sigma_m = mids[int(torch.randint(len(mids), (1,), generator=generator))]
    return sigma_e, sigma_m


@torch.no_grad()
def sc_target(
    target_flow: FlowFn, x_s: Tensor, sigma_s: Tensor | float, v1: Tensor, sigma_m: float, sigma_e: float
) -> Tensor:
    """The two-jump endpoint ``x_m - (m - e) v2`` with ``x_m = x_s - (s - m) sg(v1)``; no gradient ``[B, ...]``."""
    s = append_dims(sigma_s, x_s)
    x_m = x_s - (s - sigma_m) * v1.detach()
    v2 = target_flow(x_m, torch.full((x_s.shape[0],), sigma_m, dtype=x_s.dtype, device=x_s.device))
    return x_m - (sigma_m - sigma_e) * v2


def sc_loss(
    x_s: Tensor,
    sigma_s: Tensor | float,
    v1: Tensor,
    target_flow: FlowFn,
    sigma_m: float,
    sigma_e: float,
) -> Tensor:
    """``L_SC = mean_b[(1 - s_b) * mean((x_s - (s - e) v1 - target)^2)]``; gradient flows through ``v1`` only.

    Args:
        x_s: exit state ``[B, ...]`` (no gradient needed).
        sigma_s: its level, float or ``[B]``.
        v1: the student's flow at ``(x_s, s)`` ``[B, ...]``, with gradient.
        target_flow: the network giving ``v2`` (the live student or its EMA), run without gradient.
        sigma_m: midpoint level ``m`` (``s > m > e``).
        sigma_e: endpoint level ``e >= 0``.
    """
    s = append_dims(sigma_s, x_s)
    if not bool((s > sigma_m).all()) or not sigma_m > sigma_e >= 0:
        raise ValueError(f"need sigma_s > sigma_m > sigma_e >= 0, got {sigma_s}, {sigma_m}, {sigma_e}")
    x_s = x_s.detach()
    return sc_loss_from_target(x_s, sigma_s, v1, sc_target(target_flow, x_s, sigma_s, v1, sigma_m, sigma_e), sigma_e)


def sc_loss_from_target(x_s: Tensor, sigma_s: Tensor | float, v1: Tensor, target: Tensor, sigma_e: float) -> Tensor:
    """``L_SC`` given the two-jump ``target`` already built by :func:`sc_target` (chunk-wise rollouts build it
    at each chunk's exit step, while that chunk's KV cache is current)."""
    s = append_dims(sigma_s, x_s)
    x_s = x_s.detach()
    pred = x_s - (s - sigma_e) * v1
    per_sample = (pred - target).pow(2).reshape(x_s.shape[0], -1).mean(dim=1)
    weight = (1 - torch.as_tensor(sigma_s, dtype=x_s.dtype, device=x_s.device)).expand(x_s.shape[0])
    return (weight * per_sample).mean()

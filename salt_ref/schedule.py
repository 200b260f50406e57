r"""The rectified-flow noise schedule of Wan 2.1, in one place.

Conventions (shared by the whole codebase)::

    sigma in [0, 1]            1 = pure noise, 0 = data;   network timestep  t = 1000 * sigma
    x_sigma = (1 - sigma) * x0 + sigma * eps                          (forward process)
    v       = eps - x0                                                 (the network predicts the flow)
    x0      = x_sigma - sigma * v,      eps = x_sigma + (1 - sigma) * v
    warp(sigma; s) = s * sigma / (1 + (s - 1) * sigma)                (shift warp, Wan/SD3)

``warp`` is a group action: ``warp(warp(sigma, a), b) == warp(sigma, a * b)`` and ``warp(., 1)`` is the
identity, so a shift can be undone with ``warp(., 1 / s)``.

Few-step lists are warped the same way: ``denoising_sigmas(4, 5.0)`` turns the raw grid
``[1000, 750, 500, 250] / 1000`` into ``[1.0, 0.9375, 0.8333, 0.625]`` and appends the terminal ``0``.

Tensors: ``x`` is any shape ``[B, ...]`` (``[B, 2]`` for the 2D toy, ``[B, C, F, H, W]`` for video);
``sigma`` is a float, a 0-d tensor, or a per-sample tensor ``[B]`` broadcast over the trailing dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "T_SCALE",
    "SHIFT",
    "append_dims",
    "sigma_to_t",
    "t_to_sigma",
    "warp",
    "add_noise",
    "x0_from_flow",
    "eps_from_flow",
    "flow_from_x0",
    "flow_from_eps_x0",
    "eps_from_x0",
    "sample_sigmas",
    "denoising_sigmas",
    "randn_like",
]

T_SCALE = 1000.0  # network timestep per unit of sigma
SHIFT = 5.0  # Wan 2.1's shift at 480p, the default of salt_ref.recipe.Recipe (functions here take it explicitly)


def append_dims(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample ``sigma [B]`` against ``x [B, ...]`` by appending unit dims.

    Raises:
        ValueError: if ``sigma`` is per-sample but its length is not ``x``'s batch size.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have shape [B]={x.shape[0]} to match x {tuple(x.shape)}, "
            f"got {tuple(sigma.shape)}"
        )
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def sigma_to_t(sigma: Tensor | float) -> Tensor:
    """Network timestep ``t = 1000 * sigma``."""
    return torch.as_tensor(sigma) * T_SCALE


def t_to_sigma(t: Tensor | float) -> Tensor:
    """Noise level ``sigma = t / 1000``."""
    return torch.as_tensor(t) / T_SCALE


def warp(sigma: Tensor | float, shift: float) -> Tensor:
    """Shift warp ``s * sigma / (1 + (s - 1) * sigma)``; monotone, fixes 0 and 1.

    Args:
        sigma: noise levels in [0, 1], any shape.
        shift: ``s > 0``; ``s > 1`` moves mass towards high noise.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma = torch.as_tensor(sigma)
    if not torch.is_floating_point(sigma):
        sigma = sigma.double()
    # clamp: 1 + (s - 1) is not always exactly s in floating point, and warp must keep [0, 1]
    return (shift * sigma / (1 + (shift - 1) * sigma)).clamp(0.0, 1.0)


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward process ``x_sigma = (1 - sigma) x0 + sigma eps``; shapes ``[B, ...]``."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    s = append_dims(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_flow(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Data estimate ``x0 = x_sigma - sigma v``."""
    return x - append_dims(sigma, x) * v


def eps_from_flow(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Noise estimate ``eps = x_sigma + (1 - sigma) v``."""
    return x + (1 - append_dims(sigma, x)) * v


def flow_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """Flow ``v = (x_sigma - x0) / sigma``; undefined at ``sigma = 0`` (raises)."""
    s = append_dims(sigma, x)
    if bool((s <= 0).any()):
        raise ValueError("flow_from_x0 needs sigma > 0: at sigma = 0 the flow is not determined by x0")
    return (x - x0) / s


def flow_from_eps_x0(eps: Tensor, x0: Tensor) -> Tensor:
    """Flow ``v = eps - x0`` (the flow-matching regression target)."""
    return eps - x0


def eps_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """Noise ``eps = (x_sigma - (1 - sigma) x0) / sigma``; needs ``sigma > 0``."""
    s = append_dims(sigma, x)
    if bool((s <= 0).any()):
        raise ValueError("eps_from_x0 needs sigma > 0")
    return (x - (1 - s) * x0) / s


def sample_sigmas(
    n: int,
    *,
    kind: str = "uniform",
    shift: float = 1.0,
    sigma_min: float = 0.0,
    sigma_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` training noise levels ``[n]``: ``u ~ kind``, then ``warp(u, shift)``, clipped.

    ``kind="uniform"`` draws ``u ~ U[0, 1)``; ``kind="logit_normal"`` draws ``u = sigmoid(N(0, 1))``
    (SD3). DMD's re-noising uses ``uniform`` with shift 5 clipped to ``[0.02, 0.98]``.
    """
    if not 0.0 <= sigma_min <= sigma_max <= 1.0:
        raise ValueError(f"need 0 <= sigma_min <= sigma_max <= 1, got {sigma_min}, {sigma_max}")
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        u = torch.rand(n, generator=generator, device=gen_device)
    elif kind == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    else:
        raise ValueError(f"unknown sigma distribution {kind!r}; choose 'uniform' or 'logit_normal'")
    return warp(u, shift).clamp(sigma_min, sigma_max).to(device)


def denoising_sigmas(n_steps: int, shift: float = 1.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Few-step list ``[n_steps + 1]``: raw ``1 - i / n_steps`` for i < n_steps, warped, then a terminal 0.

    ``denoising_sigmas(4, 5.0) -> [1.0, 0.9375, 0.8333, 0.625, 0.0]`` (Self-Forcing's 4-step list).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    raw = 1.0 - torch.arange(n_steps, dtype=torch.float64) / n_steps
    return torch.cat([warp(raw, shift), torch.zeros(1, dtype=torch.float64)]).to(dtype)


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device and moved to ``x``'s.

    One CPU generator can then drive a run on any device, and its state (saved in checkpoints) decides
    every draw.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)

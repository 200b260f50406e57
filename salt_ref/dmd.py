r"""Distribution Matching Distillation: the generator loss and the critic ("fake score") loss.

Given a generated sample ``x0 [B, ...]`` (with gradient), DMD re-noises it and compares two denoisers:

    sigma ~ warp(U[0, 1), shift) clipped to [sigma_min, sigma_max] = [0.02, 0.98], t = 1000 sigma   (per sample)
    x_sigma = (1 - sigma) x0 + sigma eps
    x0_real = real(x_sigma, sigma)        (teacher, with CFG:  cond + cfg_scale * (cond - uncond), cfg_scale = 3)
    x0_fake = fake(x_sigma, sigma)        (critic, trained on the generator's samples, no CFG)
    g       = (x0_fake - x0_real) / mean_{per sample} |x0 - x0_real|         (normalizer "sample", the release)
            = (x0_fake - x0_real) / mean_{batch}      |x0 - x0_real|         (normalizer "batch")
    L_DMD   = 0.5 * mean((x0 - sg(x0 - g))^2)

Both normalisers leave the fixed point ``x0_fake = x0_real`` alone. Per sample, the mean runs over the ``C F H W``
elements of a video and is nearly the same for every sample; over the 2 coordinates of a 2D point it is a
per-point weight ``1 / |x0 - x0_real|`` that grows where the teacher's denoised estimate is close, i.e. inside
narrow modes, and shrinks in wide ones. The batch normaliser is one scale for all points.

``dL/dx0 = g / N`` (N = number of averaged elements): a descent step moves the sample towards the teacher's
denoised estimate and away from the critic's, i.e. along ``score_real - score_fake``.

The critic is an ordinary flow-matching denoiser on ``sg(x0)``: ``L_fake = mean((v_fake - (eps - x0))^2)``.

Both teacher and critic are flow networks here (``flow_fn(x, sigma [B]) -> v``); ``x0 = x_sigma - sigma v``.
A non-finite teacher or critic output is not masked: it makes the loss non-finite, and the loop stops the run.
The shift has no default here: it is the recipe's (``salt_ref.recipe.Recipe.shift``), passed by every caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from salt_ref.schedule import add_noise, randn_like, sample_sigmas, x0_from_flow
from salt_ref.updates import FlowFn

__all__ = [
    "CFG_SCALE",
    "DMD_SIGMA_MIN",
    "DMD_SIGMA_MAX",
    "NORMALIZERS",
    "cfg",
    "sample_dmd_sigmas",
    "dmd_direction",
    "dmd_loss",
    "DMDOutput",
    "dmd_generator_loss",
    "critic_loss",
]

DMD_SIGMA_MIN = 0.02  # t = 20
DMD_SIGMA_MAX = 0.98  # t = 980
CFG_SCALE = 3.0  # Self-Forcing / Salt's guidance on Wan (standard weight 4)


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in the Self-Forcing form ``cond + scale * (cond - uncond)``.

    ``scale = 3.0`` here equals the standard CFG weight ``w = scale + 1 = 4.0`` in ``uncond + w (cond - uncond)``.
    """
    return cond + scale * (cond - uncond)


def sample_dmd_sigmas(
    batch: int,
    *,
    shift: float,
    sigma_min: float = DMD_SIGMA_MIN,
    sigma_max: float = DMD_SIGMA_MAX,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """DMD's re-noising levels ``[B]``: uniform, warped by ``shift``, clipped to ``[sigma_min, sigma_max]``."""
    return sample_sigmas(
        batch,
        kind="uniform",
        shift=shift,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        generator=generator,
        device=device,
    )


NORMALIZERS = ("sample", "batch")


def dmd_direction(
    x0: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-8, normalizer: str = "sample"
) -> Tensor:
    """Normalised DMD direction ``g = (x0_fake - x0_real) / mean|x0 - x0_real|`` ``[B, ...]``.

    The mean is per sample (``normalizer="sample"``) or over the whole batch (``"batch"``). It is floored at
    ``eps`` so a generator that already equals the teacher gives a finite ``g``; a NaN/inf in the inputs stays
    in ``g`` (masking it would train on a broken teacher with gradient 0).
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown DMD normalizer {normalizer!r}; choose one of {list(NORMALIZERS)}")
    diff = (x0 - x0_real).abs()
    if normalizer == "batch":
        normaliser = diff.mean()
    else:  # a 1-d batch [B] has no per-sample dims: mean over () would reduce over everything in torch
        normaliser = diff if x0.ndim == 1 else diff.mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    normaliser = normaliser.clamp_min(eps)
    return (x0_fake - x0_real) / normaliser


def dmd_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor, normalizer: str = "sample") -> Tensor:
    """``0.5 * mean((x0 - sg(x0 - g))^2)``; only ``x0`` carries gradient (computed in float64 like the public code)."""
    with torch.no_grad():
        g = dmd_direction(x0.detach(), x0_real, x0_fake, normalizer=normalizer)
        target = (x0.detach() - g).double()
    return (0.5 * (x0.double() - target).pow(2).mean()).to(x0.dtype)


@dataclass
class DMDOutput:
    """The DMD loss and what it was built from (all but ``loss`` detached)."""

    loss: Tensor
    sigma: Tensor  # [B]
    x0_real: Tensor  # [B, ...]
    x0_fake: Tensor  # [B, ...]


def _renoise(
    x0: Tensor,
    shift: float,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator | None,
    sigma: Tensor | None,
    noise: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigma [B], eps, x_sigma)``: DMD's level (drawn unless given), noise (drawn unless given), noised ``x0``.

    The level is drawn before the noise, the order both losses share (their runs are reproducible from a seed).
    """
    if sigma is None:
        sigma = sample_dmd_sigmas(
            x0.shape[0], shift=shift, sigma_min=sigma_min, sigma_max=sigma_max, generator=generator, device=x0.device
        )
    sigma = sigma.to(x0)
    if noise is None:
        noise = randn_like(x0, generator)
    return sigma, noise, add_noise(x0, noise, sigma)


def dmd_generator_loss(
    x0: Tensor,
    real_flow: FlowFn,
    fake_flow: FlowFn,
    *,
    shift: float,
    sigma_min: float = DMD_SIGMA_MIN,
    sigma_max: float = DMD_SIGMA_MAX,
    generator: torch.Generator | None = None,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    normalizer: str = "sample",
) -> DMDOutput:
    """The full DMD generator loss for generated ``x0 [B, ...]`` (re-noise, score both, normalise).

    Args:
        x0: generator samples, with gradient.
        real_flow: the teacher's flow (CFG already folded in), ``(x, sigma [B]) -> v``.
        fake_flow: the critic's flow.
        shift: warp of the re-noising level distribution.
        sigma_min: the lower end of its clipping range.
        sigma_max: the upper end.
        sigma: fix the re-noising level ``[B]`` (drawn if ``None``).
        noise: fix the noise ``[B, ...]`` (drawn if ``None``).
        normalizer: ``"sample"`` or ``"batch"`` (:func:`dmd_direction`).
    """
    sigma, noise, x_sigma = _renoise(x0.detach(), shift, sigma_min, sigma_max, generator, sigma, noise)
    with torch.no_grad():
        x0_real = x0_from_flow(x_sigma, sigma, real_flow(x_sigma, sigma))
        x0_fake = x0_from_flow(x_sigma, sigma, fake_flow(x_sigma, sigma))
    return DMDOutput(dmd_loss(x0, x0_real, x0_fake, normalizer), sigma, x0_real, x0_fake)


def critic_loss(
    fake_flow: FlowFn,
    x0: Tensor,
    *,
    shift: float,
    sigma_min: float = DMD_SIGMA_MIN,
    sigma_max: float = DMD_SIGMA_MAX,
    generator: torch.Generator | None = None,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Flow-matching loss of the critic on generator samples: ``mean((v_fake(x_sigma) - (eps - x0))^2)``.

    ``x0 [B, ...]`` is detached here; the level is drawn as for DMD (uniform, shifted, clipped).
    """
    x0 = x0.detach()
    sigma, noise, x_sigma = _renoise(x0, shift, sigma_min, sigma_max, generator, sigma, noise)
    return (fake_flow(x_sigma, sigma) - (noise - x0)).pow(2).mean()

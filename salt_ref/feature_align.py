r"""Cache-conditioned feature alignment: token-relation distillation (TRD) between two outputs.

The student's chunk outputs ``x0`` (written under a low-quality cache, with gradient) and the reference outputs
``x0_ref`` (same student, high-quality cache, no gradient) are noised with the *same* noise at a small level,
and a frozen network (the teacher) is run on both; its hidden states after one block are compared::

    t_f ~ U[0, 200], sigma_f = clip(warp(t_f / 1000, 5), 0.02, 0.98)
    h   = Teacher_block(add_noise(x0, eps, sigma_f)),   h_ref = Teacher_block(add_noise(x0_ref, eps, sigma_f))
    per frame f:  Z = h_f / ||h_f|| (token-wise),  G = Z Z^T  [S, S]
    L_align = mean_f mean( relu(|G - G_ref| - m) ),   m = 0.1;   weight 0.1

Only the token *relations* inside a frame are matched, not the features themselves, and differences under the
margin ``m`` cost nothing. Gradients reach the student only through ``x0`` (the teacher is frozen).
Shapes: features ``[B, F * S, D]`` with ``S`` tokens per frame.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from salt_ref.dmd import DMD_SIGMA_MAX, DMD_SIGMA_MIN
from salt_ref.schedule import T_SCALE, add_noise, randn_like, warp

__all__ = ["ALIGN_WEIGHT", "TRD_MARGIN", "ALIGN_T_MAX", "token_relation_loss", "sample_align_sigmas", "alignment_loss"]

ALIGN_WEIGHT = 0.1
TRD_MARGIN = 0.1
ALIGN_T_MAX = 200.0  # alignment levels t ~ U[0, 200]: nearly clean, so the features see the chunk's content

FeatureFn = Callable[[Tensor, Tensor], Tensor]
"""``feature_fn(x [B, C, F, H, W], sigma [B]) -> hidden states [B, F * S, D]`` of a frozen network."""


def token_relation_loss(feat: Tensor, feat_ref: Tensor, frames: int, margin: float = TRD_MARGIN) -> Tensor:
    """``mean_f mean(relu(|G_f - G_ref_f| - margin))`` with per-frame Gram matrices of L2-normalised tokens."""
    if feat.shape != feat_ref.shape or feat.ndim != 3:
        raise ValueError(f"features must both be [B, F*S, D], got {tuple(feat.shape)} and {tuple(feat_ref.shape)}")
    if feat.shape[1] % frames:
        raise ValueError(f"{feat.shape[1]} tokens are not {frames} frames of equal size")
    z = F.normalize(feat.float().unflatten(1, (frames, -1)), dim=-1)  # [B, F, S, D]
    z_ref = F.normalize(feat_ref.float().unflatten(1, (frames, -1)), dim=-1)
    gram, gram_ref = z @ z.transpose(-1, -2), z_ref @ z_ref.transpose(-1, -2)
    return torch.relu((gram - gram_ref).abs() - margin).mean()


def sample_align_sigmas(
    batch: int, *, shift: float, t_max: float = ALIGN_T_MAX, generator: torch.Generator | None = None
) -> Tensor:
    """Alignment noise levels ``[B]``: ``t ~ U[0, t_max]``, warped by ``shift``, clipped to ``[0.02, 0.98]``."""
    u = torch.rand(batch, generator=generator) * (t_max / T_SCALE)
    return warp(u, shift).clamp(DMD_SIGMA_MIN, DMD_SIGMA_MAX)


def alignment_loss(
    feature_fn: FeatureFn,
    x0: Tensor,
    x0_ref: Tensor,
    *,
    frames: int,
    shift: float,
    margin: float = TRD_MARGIN,
    t_max: float = ALIGN_T_MAX,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRD between the frozen network's features on ``x0`` (grad) and ``x0_ref`` (no grad), same noise.

    ``shift`` is the recipe's (the student's schedule): it has no default so it cannot silently differ.
    """
    sigma = sample_align_sigmas(x0.shape[0], shift=shift, t_max=t_max, generator=generator).to(x0)
    eps = randn_like(x0, generator)
    with torch.no_grad():
        feat_ref = feature_fn(add_noise(x0_ref.detach(), eps, sigma), sigma)
    feat = feature_fn(add_noise(x0, eps, sigma), sigma)
    return token_relation_loss(feat, feat_ref, frames, margin)

r"""Quality of generated clips of the video world, measured from its known physics (no network).

Per frame, the disc is read back from the mask ``m = max_channel((frame + 1) / 2)`` (exact for clean renders)::

    centre  c = sum(m x) / sum(m),   radius r = sqrt(sum(m) / pi),   colour k = sum(m frame) / sum(m)
    fidelity_f = mean((frame - render(c, r, k))^2)                      (0 for a clean frame)

Across frames, the best physical track (constant velocity with wall bounces, per axis; grid search over start
and velocity, then the residual) gives the *motion coherence* ``sqrt(mean |c_t - p_t|^2)`` in pixels.
``drift_curve`` is the fidelity by frame index (read it far past the trained length), ``class_accuracy`` the share
of clips whose colour is their label's, and ``frechet_distance`` compares Gaussian fits of physics features
``[start (2), velocity (2), radius, colour (3), fidelity]`` between two sets of clips.
Shapes: videos ``[N, 3, F, S, S]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from toy.video_world import PALETTE, disc_mask, reflect

__all__ = [
    "FrameFit",
    "fit_frames",
    "frame_fidelity",
    "drift_curve",
    "fit_tracks",
    "motion_coherence",
    "class_accuracy",
    "physics_features",
    "frechet_distance",
    "diversity",
    "evaluate_video",
]


@dataclass
class FrameFit:
    """Per-frame fits: ``centre [N, F, 2]``, ``radius [N, F]``, ``colour [N, F, 3]``, ``fidelity [N, F]``."""

    centre: Tensor
    radius: Tensor
    colour: Tensor
    fidelity: Tensor


def _check(video: Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3 or video.shape[-1] != video.shape[-2]:
        raise ValueError(f"video must be [N, 3, F, S, S], got {tuple(video.shape)}")


def fit_frames(video: Tensor) -> FrameFit:
    """Read centre, radius and colour of the disc in every frame, and the residual of the clean re-render."""
    _check(video)
    v = video.float().clamp(-1, 1)
    size = v.shape[-1]
    m = ((v + 1) / 2).amax(dim=1)  # [N, F, S, S]
    mass = m.sum(dim=(-1, -2)).clamp_min(1e-6)
    coords = torch.arange(size, dtype=v.dtype)
    cx = (m * coords[None, None, None, :]).sum(dim=(-1, -2)) / mass
    cy = (m * coords[None, None, :, None]).sum(dim=(-1, -2)) / mass
    centre = torch.stack([cx, cy], dim=-1)
    radius = (mass / math.pi).sqrt()
    colour = (v * m[:, None]).sum(dim=(-1, -2)) / mass[:, None]  # [N, 3, F]
    colour = colour.permute(0, 2, 1)
    rerender = -1 + disc_mask(centre, radius, size)[:, None] * (colour.permute(0, 2, 1)[..., None, None] + 1)
    fidelity = (v - rerender).pow(2).mean(dim=(1, 3, 4))
    return FrameFit(centre, radius, colour, fidelity)


def frame_fidelity(video: Tensor) -> Tensor:
    """Per-frame residual ``[N, F]`` (lower is better; 0 for a clean render)."""
    return fit_frames(video).fidelity


def drift_curve(video: Tensor) -> Tensor:
    """Mean fidelity by frame index ``[F]``."""
    return frame_fidelity(video).mean(dim=0)


def fit_tracks(fit: FrameFit, size: int, *, n_speed: int = 161, n_start: int = 81) -> tuple[Tensor, Tensor, Tensor]:
    """Best bouncing track per clip: ``(start [N, 2], velocity [N, 2], residual track [N, F, 2])``.

    Per axis, a grid search over start in ``[lo, hi]`` and velocity in ``[-2, 2]`` px/frame (then one finer pass
    around the best), with the walls at the clip's median fitted radius.
    """
    n, f, _ = fit.centre.shape
    r = fit.radius.median(dim=1).values  # [N]
    lo, hi = r, size - 1 - r
    t = torch.arange(f, dtype=fit.centre.dtype)
    starts, vels, tracks = [], [], []
    for axis in range(2):
        obs = fit.centre[..., axis]  # [N, F]
        p_lo, p_hi = lo[:, None], hi[:, None]
        p_grid = p_lo + (p_hi - p_lo) * torch.linspace(0, 1, n_start)[None]  # [N, P]
        v_grid = torch.linspace(-2, 2, n_speed)[None].expand(n, -1)  # [N, V]
        for _ in range(2):
            pos = p_grid[:, :, None, None] + v_grid[:, None, :, None] * t  # [N, P, V, F]
            track = reflect(pos, lo[:, None, None, None], hi[:, None, None, None])
            err = (track - obs[:, None, None]).pow(2).mean(-1)  # [N, P, V]
            best = err.flatten(1).argmin(1)
            bp, bv = best // err.shape[2], best % err.shape[2]
            p_best = p_grid.gather(1, bp[:, None])[:, 0]
            v_best = v_grid.gather(1, bv[:, None])[:, 0]
            dp = (hi - lo) / (n_start - 1)
            dv = 4.0 / (n_speed - 1)
            p_grid = p_best[:, None] + dp[:, None] * torch.linspace(-1, 1, 21)[None]
            v_grid = v_best[:, None] + dv * torch.linspace(-1, 1, 21)[None]
        starts.append(p_best)
        vels.append(v_best)
        tracks.append(reflect(p_best[:, None] + v_best[:, None] * t, lo[:, None], hi[:, None]))
    return torch.stack(starts, -1), torch.stack(vels, -1), torch.stack(tracks, -1)


def motion_coherence(video: Tensor) -> Tensor:
    """RMS distance ``[N]`` (pixels) between the fitted centres and the best physical bouncing track."""
    fit = fit_frames(video)
    _, _, track = fit_tracks(fit, video.shape[-1])
    return (fit.centre - track).pow(2).sum(-1).mean(-1).sqrt()


def class_accuracy(video: Tensor, labels: Tensor) -> float:
    """Share of clips whose mean fitted colour is nearest to their label's palette colour."""
    colour = fit_frames(video).colour.mean(dim=1)  # [N, 3]
    pred = torch.cdist(colour, PALETTE).argmin(dim=1)
    return float((pred == labels.long()).float().mean())


def physics_features(video: Tensor) -> Tensor:
    """``[N, 9]``: fitted start (2), velocity (2), median radius, mean colour (3), mean fidelity."""
    fit = fit_frames(video)
    start, vel, _ = fit_tracks(fit, video.shape[-1])
    return torch.cat(
        [start, vel, fit.radius.median(1).values[:, None], fit.colour.mean(1), fit.fidelity.mean(1, keepdim=True)],
        dim=1,
    )


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` between Gaussian fits (float64)."""
    a, b = a.double(), b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need two [N >= 2, K] feature sets of equal K, got {tuple(a.shape)}, {tuple(b.shape)}")

    def sqrtm(m: Tensor) -> Tensor:
        w, q = torch.linalg.eigh((m + m.T) / 2)
        return q @ torch.diag(w.clamp_min(0).sqrt()) @ q.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm(s_a)
    cross = sqrtm(root @ s_b @ root)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross))


def diversity(video: Tensor, labels: Tensor) -> float:
    """Mean over classes of the mean pairwise distance of (start, velocity) features within the class."""
    feats = physics_features(video)[:, :4]
    values = []
    for c in labels.unique():
        f = feats[labels == c]
        if len(f) > 1:
            values.append(torch.pdist(f).mean())
    return float(torch.stack(values).mean()) if values else 0.0


def evaluate_video(video: Tensor, labels: Tensor, reference: Tensor) -> dict[str, float]:
    """Fidelity, motion coherence, class accuracy, diversity and Frechet distance to ``reference`` clips."""
    return {
        "fidelity": float(frame_fidelity(video).mean()),
        "motion": float(motion_coherence(video).mean()),
        "class_acc": class_accuracy(video, labels),
        "diversity": diversity(video, labels),
        "frechet": frechet_distance(physics_features(video), physics_features(reference)),
    }

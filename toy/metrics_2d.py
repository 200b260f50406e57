r"""Mode-based metrics for samples of a Gaussian-mixture target ``sum_k w_k N(mu_k, c_k^2 I)``.

Every sample ``x [N, D]`` is scored by its distance to the nearest mode in units of that mode's std:

    d_k(x) = |x - mu_k| / c_k,      k*(x) = argmin_k d_k(x),      d(x) = d_{k*}(x)
    high quality  :  d(x) <= 3           (in 2D a true sample passes with probability 1 - exp(-9/2) = 0.989)
    off manifold  :  d(x) >  6           (farther than 6 stds from every mode; a true sample: exp(-18) ~ 1e-8)
    mode k captured  :  #{x : k*(x) = k, d(x) <= 3} >= max(1, ceil(0.05 * N * w_k))

``N w_k`` is the count mode ``k`` expects (``N / K`` for equal weights), so a mode counts as captured when it
holds at least 5% of its share as high-quality samples, and at least one. Non-finite samples (a diverged
student) count as off manifold. :func:`evaluate_2d` adds the distribution distances of
:mod:`salt_ref.metrics` against reference samples of the target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from salt_ref.metrics import energy_distance, precision_recall_knn, sliced_wasserstein
from toy.gmm import GaussianMixture

__all__ = [
    "MIN_SHARE",
    "assign_modes",
    "modes_captured",
    "high_quality_share",
    "off_manifold_mass",
    "evaluate_2d",
]

MIN_SHARE = 0.05  # a captured mode holds at least this fraction of its expected count N * w_k


def assign_modes(x: Tensor, gmm: GaussianMixture) -> tuple[Tensor, Tensor]:
    """Nearest mode of each sample by ``|x - mu_k| / c_k``.

    Args:
        x: samples ``[N, D]`` with ``D = gmm.dim``.

    Returns:
        ``(idx [N], dist_in_stds [N])``: mode index ``k*`` and ``d_{k*}(x)`` (``inf`` for non-finite rows).
    """
    if x.ndim != 2 or x.shape[1] != gmm.dim:
        raise ValueError(f"x must be [N, D={gmm.dim}] for this mixture, got shape {tuple(x.shape)}")
    means = gmm.means.to(device=x.device, dtype=torch.float64)
    stds = gmm.stds.to(device=x.device, dtype=torch.float64)
    d = torch.cdist(x.to(torch.float64), means) / stds[None]  # [N, K]
    d = torch.nan_to_num(d, nan=math.inf)  # a NaN sample is nowhere near any mode
    dist, idx = d.min(dim=1)
    return idx, dist


def modes_captured(x: Tensor, gmm: GaussianMixture, n_std: float = 3.0, min_share: float | None = None) -> int:
    """Number of modes holding at least ``max(1, ceil(min_share * N * w_k))`` samples within ``n_std`` stds.

    ``min_share`` defaults to :data:`MIN_SHARE` (5% of the expected per-mode count ``N w_k``, ``N / K`` for
    equal weights), which ignores a mode reached by a few stray samples but counts one that is under-filled.
    """
    share = MIN_SHARE if min_share is None else min_share
    if share < 0:
        raise ValueError(f"min_share must be >= 0, got {share}")
    idx, dist = assign_modes(x, gmm)
    counts = torch.bincount(idx[dist <= n_std], minlength=gmm.n_modes)
    need = (share * x.shape[0] * gmm.weights.to(torch.float64)).ceil().clamp_min(1).to(counts.device)
    return int((counts >= need).sum())


def high_quality_share(x: Tensor, gmm: GaussianMixture, n_std: float = 3.0) -> float:
    """Share of samples ``[N, D]`` within ``n_std`` stds of their nearest mode."""
    _, dist = assign_modes(x, gmm)
    return float((dist <= n_std).to(torch.float64).mean())


def off_manifold_mass(x: Tensor, gmm: GaussianMixture, n_std: float = 6.0) -> float:
    """Share of samples ``[N, D]`` farther than ``n_std`` stds from every mode (non-finite ones included)."""
    _, dist = assign_modes(x, gmm)
    return float((dist > n_std).to(torch.float64).mean())


def evaluate_2d(
    samples: Tensor, gmm: GaussianMixture, reference: Tensor, generator: torch.Generator | None = None
) -> dict[str, float]:
    """All toy metrics of ``samples [N, D]`` against the target ``gmm`` and its samples ``reference [M, D]``.

    Returns:
        ``sw`` (sliced W2, directions from ``generator``), ``energy`` (V-statistic energy distance),
        ``modes`` (captured), ``hq_share``, ``off_manifold``, ``precision``, ``recall`` (k = 5).
        A non-finite sample makes ``sw`` and ``energy`` infinite and counts as outside the reference
        manifold for ``precision``; ``recall`` uses the finite samples' balls.
    """
    for t, name in ((samples, "samples"), (reference, "reference")):
        if t.ndim != 2 or t.shape[1] != gmm.dim:
            raise ValueError(f"{name} must be [N, D={gmm.dim}] for this mixture, got shape {tuple(t.shape)}")
    keep = torch.isfinite(samples).all(dim=1)
    finite = samples[keep]
    if finite.shape[0] > 5:  # precision_recall_knn needs more than k = 5 points
        precision, recall = precision_recall_knn(finite, reference)
        precision *= finite.shape[0] / samples.shape[0]
    else:
        precision, recall = 0.0, 0.0
    if bool(keep.all()):
        sw = sliced_wasserstein(samples, reference, generator=generator)
        energy = energy_distance(samples, reference)
    else:  # the distance to the target is undefined; report the worst value rather than hide the divergence
        sw, energy = math.inf, math.inf
    return {
        "sw": sw,
        "energy": energy,
        "modes": float(modes_captured(samples, gmm)),
        "hq_share": high_quality_share(samples, gmm),
        "off_manifold": off_manifold_mass(samples, gmm),
        "precision": precision,
        "recall": recall,
    }

r"""Mode-based metrics for samples of a Gaussian-mixture target ``sum_k w_k N(mu_k, c_k^2 I)``.

Every sample ``x [N, D]`` is scored by its distance to the nearest mode in units of that mode's std:

    d_k(x) = |x - mu_k| / c_k,      k*(x) = argmin_k d_k(x),      d(x) = d_{k*}(x)
    high quality  :  d(x) <= 3           (in 2D a true sample passes with probability 1 - exp(-9/2) = 0.989)
    off manifold  :  d(x) >  6           (farther than 6 stds from every mode; a true sample: exp(-18) ~ 1e-8)
    mode k captured  :  #{x : k*(x) = k, d(x) <= 3} >= max(1, ceil(0.05 * N * w_k))

    mode-share error  :  mode_tv = 1/2 sum_k |q_k - w_k| + 1/2 q_lost,   q_k = (1/N) sum_{x finite} r_k(x)

with ``r_k(x) = P(k | x)`` the clean mixture's responsibilities (``GaussianMixture.responsibilities``) and
``q_lost`` the share of non-finite samples. For true samples ``E[r_k(x)] = w_k`` exactly, so ``mode_tv``
measures only the mass in the wrong components (plus sampling noise ``~ sqrt(K / N) / 2``).

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
    "METRICS_ABOUT",
    "MIN_SHARE",
    "assign_modes",
    "modes_captured",
    "high_quality_share",
    "off_manifold_mass",
    "mode_shares",
    "mode_tv",
    "evaluate_2d",
]

# What final_metrics.json says of each number: its direction and what it measures.
METRICS_ABOUT: dict[str, str] = {
    "energy": "lower is better; energy distance to fresh target samples (V-statistic); see reference.data for "
    "the finite-sample floor and reference.teacher for the exact teacher",
    "mode_tv": "lower is better; total variation between the per-component share of the samples and the weights",
    "sw": "lower is better; sliced Wasserstein-2 distance to the target samples",
    "modes": "higher is better; components holding at least 5% of their expected share within 3 stds",
    "hq_share": "higher is better up to the data's ~0.99; share within 3 stds of the nearest mode (rewards "
    "piling mass into a wide mode: read it after energy and mode_tv)",
    "off_manifold": "lower is better; share farther than 6 stds from every mode",
    "precision": "higher is better; share of samples inside the target's k-NN balls (k = 5)",
    "recall": "higher is better; share of target samples inside the samples' k-NN balls (k = 5)",
    "composition_defect": "what SC-DMD optimises, not a quality measure: gap between one-jump and composed "
    "8-step DDIM endpoints (the exact teacher is not 0 here)",
}

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


def mode_shares(x: Tensor, gmm: GaussianMixture) -> Tensor:
    """``q [K]``: the samples' ``[N, D]`` mean clean-mixture responsibility per component (non-finite rows add 0)."""
    if x.ndim != 2 or x.shape[1] != gmm.dim:
        raise ValueError(f"x must be [N, D={gmm.dim}] for this mixture, got shape {tuple(x.shape)}")
    keep = torch.isfinite(x).all(dim=1)
    r = gmm.responsibilities(x[keep].to(torch.float64))
    return r.sum(0) / x.shape[0]


def mode_tv(x: Tensor, gmm: GaussianMixture) -> float:
    """Total variation between the samples' mode shares and the weights ``w``; lost (non-finite) mass counts."""
    q = mode_shares(x, gmm)
    lost = 1.0 - float(q.sum())
    return 0.5 * float((q - gmm.weights.to(torch.float64)).abs().sum()) + 0.5 * max(lost, 0.0)


def evaluate_2d(
    samples: Tensor, gmm: GaussianMixture, reference: Tensor, generator: torch.Generator | None = None
) -> dict[str, float]:
    """All toy metrics of ``samples [N, D]`` against the target ``gmm`` and its samples ``reference [M, D]``.

    The distances to the reference (``sw``, ``energy``, ``precision``, ``recall``) use the first ``M`` samples
    (``M <= N``: the energy distance is quadratic in ``M``); the mode metrics use all ``N``, so a larger ``N``
    lowers their sampling noise at little cost.

    Returns:
        ``energy`` (V-statistic energy distance), ``mode_tv`` (mode-share error), ``sw`` (sliced W2,
        directions from ``generator``), ``modes`` (captured), ``hq_share``, ``off_manifold``, ``precision``,
        ``recall`` (k = 5). A non-finite sample makes ``sw`` and ``energy`` infinite and counts as outside the
        reference manifold for ``precision``; ``recall`` uses the finite samples' balls.
    """
    for t, name in ((samples, "samples"), (reference, "reference")):
        if t.ndim != 2 or t.shape[1] != gmm.dim:
            raise ValueError(f"{name} must be [N, D={gmm.dim}] for this mixture, got shape {tuple(t.shape)}")
    if samples.shape[0] < reference.shape[0]:
        raise ValueError(f"need at least as many samples ({samples.shape[0]}) as reference points "
                         f"({reference.shape[0]})")  # fmt: skip
    head = samples[: reference.shape[0]]
    keep = torch.isfinite(head).all(dim=1)
    finite = head[keep]
    if finite.shape[0] > 5:  # precision_recall_knn needs more than k = 5 points
        precision, recall = precision_recall_knn(finite, reference)
        precision *= finite.shape[0] / head.shape[0]
    else:
        precision, recall = 0.0, 0.0
    if bool(keep.all()):
        sw = sliced_wasserstein(head, reference, generator=generator)
        energy = energy_distance(head, reference)
    else:  # the distance to the target is undefined; report the worst value rather than hide the divergence
        sw, energy = math.inf, math.inf
    return {
        "energy": energy,
        "mode_tv": mode_tv(samples, gmm),
        "sw": sw,
        "modes": float(modes_captured(samples, gmm)),
        "hq_share": high_quality_share(samples, gmm),
        "off_manifold": off_manifold_mass(samples, gmm),
        "precision": precision,
        "recall": recall,
    }

r"""Sample-quality distances and the student's composition defect, for data of any dimension ``D``.

Sample sets are ``x [N, D]`` and ``y [M, D]`` (flatten video first); every sum is computed in float64.

    SW2(x, y)^2  = mean_theta W2^2(theta.x, theta.y),   theta uniform on the unit sphere (n_projections draws)
    W2^2 in 1D   = mean_q (F_x^-1(q) - F_y^-1(q))^2      on the grid q_i = (i + 1/2) / max(N, M),
                   F^-1 the empirical (step) quantile function of the projected samples
    E(x, y)      = 2 E|X - Y| - E|X - X'| - E|Y - Y'|     (V-statistic: every pair, diagonal included)
    precision    = share of gen  in  U_j B(ref_j, r_k(ref_j)),   r_k = distance to the k-th neighbour
    recall       = share of ref  in  U_i B(gen_i, r_k(gen_i))    (Kynkaenniemi et al. 2019)

Composition defect of a flow ``v`` at ``x_s`` on level ``s``, midpoint ``m``, endpoint ``e`` (``s > m > e``):

    one    = x_s - (s - e) v(x_s, s)                                  (one DDIM jump s -> e)
    x_m    = x_s - (s - m) v(x_s, s),   two = x_m - (m - e) v(x_m, m) (two composed jumps s -> m -> e)
    defect = |one - two| / |one - x_s| = ((m - e) / (s - e)) |v(x_m, m) - v(x_s, s)| / |v(x_s, s)|

It is 0 exactly when the flow is constant along its own path over ``[e, s]`` (e.g. the exact flow of a point
mass, for which DDIM is exact) and measures, relative to the jump's length, how far one jump lands from two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from salt_ref.schedule import append_dims
from salt_ref.updates import FlowFn, rollout

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "precision_recall_knn",
    "composition_defect",
    "rollout_composition_defect",
]

DEFAULT_SEED = 0  # sliced_wasserstein without a generator uses this seed, so repeated calls agree
CHUNK = 1024  # rows per block of pairwise distances: 1024 x 5000 float64 is 40 MB, not 200 MB


def _check_sets(x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y")) -> tuple[Tensor, Tensor]:
    """Validate two sample sets ``[N, D]``, ``[M, D]`` and return them as float64 on ``x``'s device."""
    for t, name in zip((x, y), names, strict=True):
        if t.ndim != 2:
            raise ValueError(f"{name} must be a set of samples [N, D], got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} {tuple(x.shape)} and {names[1]} {tuple(y.shape)} must have the same dimension D")
    return x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)


def _quantiles(sorted_proj: Tensor, n_levels: int) -> Tensor:
    """Empirical quantiles of sorted columns ``[n, P]`` at ``q_i = (i + 1/2) / n_levels``: ``[n_levels, P]``.

    ``F^-1(q) = x_(ceil(q n) - 1)``, evaluated in integers as ``x_(floor((2i + 1) n / (2 n_levels)))``: the
    step function of the empirical measure itself, not a smoothed one, so the midpoint rule of SW is exact
    whenever ``n`` divides ``n_levels`` (and ``x`` against a duplicated copy of itself is exactly 0).
    """
    n = sorted_proj.shape[0]
    i = torch.arange(n_levels, device=sorted_proj.device)
    return sorted_proj[((2 * i + 1) * n) // (2 * n_levels)]


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein ``SW2 = sqrt(mean_theta W2^2(theta.x, theta.y))`` of ``x [N, D]``, ``y [M, D]``.

    Directions are Gaussian draws normalised to the unit sphere. Both projected empirical quantile functions
    are read on one grid of ``max(N, M)`` equally spaced levels, so ``N != M`` is handled (exactly when one
    size divides the other, else up to the grid's midpoint-rule error). The root is taken after
    the mean over directions (the standard SW2, a metric), so SW2 of ``x`` and ``x + d`` is ``|d| / sqrt(D)``
    in expectation over directions.

    Args:
        generator: draws the directions (on the CPU); ``None`` uses a fresh generator seeded with 0.
    """
    x, y = _check_sets(x, y)
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SEED)
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x @ theta).sort(dim=0)  # [N, P]
    py, _ = (y @ theta).sort(dim=0)  # [M, P]
    n_q = max(px.shape[0], py.shape[0])
    w2_sq = (_quantiles(px, n_q) - _quantiles(py, n_q)).pow(2).mean(dim=0)  # [P]: W2^2 per direction
    return math.sqrt(float(w2_sq.mean()))


def _mean_pairwise_distance(a: Tensor, b: Tensor, chunk: int = CHUNK) -> Tensor:
    """``mean_{i, j} |a_i - b_j|`` over all ``N x M`` pairs, in row blocks: memory ``O(chunk * M)``."""
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[start : start + chunk], b).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor, *, chunk_size: int = CHUNK) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between sample sets ``[N, D]`` and ``[M, D]``.

    The V-statistic: each expectation averages over all pairs, self-pairs included. It is then the exact
    (squared-form) energy distance between the two empirical measures, so it is ``>= 0`` and exactly 0 for
    identical sets; its bias, ``O(1/N + 1/M)``, is what two samples of one distribution read as.
    Pairwise distances are computed ``chunk_size`` rows at a time (N, M of several thousand are fine).
    """
    x, y = _check_sets(x, y)
    e_xy = _mean_pairwise_distance(x, y, chunk_size)
    e_xx = _mean_pairwise_distance(x, x, chunk_size)
    e_yy = _mean_pairwise_distance(y, y, chunk_size)
    # clamp: rounding can leave -1e-17 for identical sets, and the true value is never negative
    return max(float(2 * e_xy - e_xx - e_yy), 0.0)


def _kth_neighbour_radius(x: Tensor, k: int, chunk: int = CHUNK) -> Tensor:
    """Distance from each row of ``x [N, D]`` to its k-th nearest other row ``[N]`` (self excluded)."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk], x)
        # the k + 1 smallest include the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _share_covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = CHUNK) -> float:
    """Share of ``points [N, D]`` inside at least one ball ``B(centres_j, radii_j)``."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start : start + chunk], centres)  # [c, M]
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall_knn(gen: Tensor, ref: Tensor, k: int = 5) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``gen [N, D]`` against ``ref [M, D]``.

    Each set's manifold is the union of balls around its points with radius the distance to the point's
    k-th nearest neighbour in the same set. Precision is the share of ``gen`` inside the ``ref`` manifold
    (sample quality); recall is the share of ``ref`` inside the ``gen`` manifold (coverage).

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``.
    """
    gen, ref = _check_sets(gen, ref, ("gen", "ref"))
    if k < 1 or k >= min(gen.shape[0], ref.shape[0]):
        raise ValueError(f"k must be in [1, min(N, M) - 1] = [1, {min(gen.shape[0], ref.shape[0]) - 1}], got {k}")
    precision = _share_covered(gen, ref, _kth_neighbour_radius(ref, k))
    recall = _share_covered(ref, gen, _kth_neighbour_radius(gen, k))
    return precision, recall


@torch.no_grad()
def composition_defect(flow_fn: FlowFn, x_s: Tensor, sigma_s: Tensor | float, sigma_m: float, sigma_e: float) -> Tensor:
    """Per-sample ``|one - two| / max(|one - x_s|, 1e-12)``: one jump ``s -> e`` against two ``s -> m -> e``.

    Args:
        flow_fn: the network, ``(x [B, ...], sigma [B]) -> v [B, ...]``.
        x_s: states ``[B, ...]`` at level ``sigma_s``.
        sigma_s: a float or per-sample ``[B]``; ``sigma_m``, ``sigma_e`` floats with ``s > m > e >= 0``.

    Returns:
        The defect ``[B]`` (norms over all non-batch dims); no gradient.
    """
    if x_s.ndim < 2:
        raise ValueError(f"x_s must be a batch [B, ...], got shape {tuple(x_s.shape)}")
    batch = x_s.shape[0]
    s = append_dims(sigma_s, x_s)
    if not bool((s > sigma_m).all()) or not sigma_m > sigma_e >= 0:
        raise ValueError(f"need sigma_s > sigma_m > sigma_e >= 0, got {sigma_s}, {sigma_m}, {sigma_e}")
    v1 = flow_fn(x_s, s.reshape(-1).expand(batch))
    one = x_s - (s - sigma_e) * v1
    x_m = x_s - (s - sigma_m) * v1
    v2 = flow_fn(x_m, torch.full((batch,), sigma_m, dtype=x_s.dtype, device=x_s.device))
    two = x_m - (sigma_m - sigma_e) * v2
    gap = (one - two).flatten(1).norm(dim=1)
    displacement = (one - x_s).flatten(1).norm(dim=1)
    return gap / displacement.clamp_min(1e-12)


@torch.no_grad()
def rollout_composition_defect(
    flow_fn: FlowFn,
    noise: Tensor,
    fine_sigmas: Tensor,
    coarse_sigmas: Sequence[float] | Tensor,
    mode: str = "ddim",
    generator: torch.Generator | None = None,
) -> float:
    """Mean composition defect over the states a full rollout of the student visits.

    Runs :func:`salt_ref.updates.rollout` from ``noise [B, ...]`` along ``fine_sigmas [L + 1]`` (terminal 0).
    At each visited state ``k = 0 .. L - 2`` (level ``s = fine[k]``) it takes ``m = fine[k + 1]`` and ``e`` =
    the highest coarse level strictly below ``m``, and averages :func:`composition_defect` over states and
    samples. The last state has no fine point between it and 0, so (as in SC-DMD's training) it is skipped.

    Args:
        coarse_sigmas: the coarse grid including 0, e.g. :func:`salt_ref.sc_dmd.coarse_boundaries`.
        mode: the rollout's update, ``"ddim"`` or ``"renoise"`` (noise from ``generator``).
    """
    if fine_sigmas.ndim != 1 or fine_sigmas.numel() < 3:
        raise ValueError(f"fine_sigmas must be [L + 1], L >= 2 steps, got shape {tuple(fine_sigmas.shape)}")
    if float(fine_sigmas[-1]) != 0.0:
        raise ValueError(f"fine_sigmas must end at 0, got {fine_sigmas.tolist()}")
    coarse = sorted((float(c) for c in torch.as_tensor(coarse_sigmas).reshape(-1)), reverse=True)
    if not coarse or coarse[-1] != 0.0:
        raise ValueError(f"coarse_sigmas must include 0, got {coarse}")
    visited = rollout(flow_fn, noise, fine_sigmas, mode=mode, generator=generator, grad_exit=False).states
    defects = []
    for k in range(fine_sigmas.numel() - 2):
        sigma_s, sigma_m = float(fine_sigmas[k]), float(fine_sigmas[k + 1])
        sigma_e = next((c for c in coarse if c < sigma_m), None)
        if sigma_e is None:  # only when a fine level before the last one is already 0
            raise ValueError(f"no coarse level below {sigma_m} (fine_sigmas {fine_sigmas.tolist()})")
        defects.append(composition_defect(flow_fn, visited[k], sigma_s, sigma_m, sigma_e))
    return float(torch.stack(defects).to(torch.float64).mean())

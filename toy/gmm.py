r"""Gaussian-mixture targets in 2D whose noised denoiser and flow are exact.

Data ``x0 ~ sum_k w_k N(mu_k, c_k^2 I)``. Under ``x = (1 - sigma) x0 + sigma eps`` with ``a = 1 - sigma``,
each component stays Gaussian: ``x | k ~ N(a mu_k, S_k^2 I)``, ``S_k^2 = a^2 c_k^2 + sigma^2``. So

    r_k(x)        = softmax_k( log w_k - |x - a mu_k|^2 / (2 S_k^2) - d log S_k )      (responsibilities)
    E[x0 | x, k]  = mu_k + (a c_k^2 / S_k^2) (x - a mu_k)
    E[eps | x, k] = (sigma / S_k^2) (x - a mu_k)
    v*(x, sigma)  = sum_k r_k (E[eps | x, k] - E[x0 | x, k])                             (exact flow)

The exact flow is finite at ``sigma = 0`` when every ``c_k > 0``. For a single Gaussian the probability-flow
ODE has the closed-form map ``Phi_{t->s}(x) = a_s mu + (S_s / S_t)(x - a_t mu)``
(:func:`gaussian_flow_map`), which composes exactly: ``Phi_{u->s} o Phi_{t->u} = Phi_{t->s}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from salt_ref.schedule import append_dims

__all__ = ["GaussianMixture", "ring8", "grid25", "make_target", "gaussian_flow_map", "TARGETS"]


@dataclass
class GaussianMixture:
    """An isotropic Gaussian mixture: ``means [K, D]``, ``stds [K]``, ``weights [K]`` (normalised here)."""

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float32)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float32).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32).expand(k).clone()
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got {tuple(self.means.shape)}")
        if bool((self.stds <= 0).any()):
            raise ValueError("every component std must be positive (the exact flow needs spread)")
        if bool((self.weights < 0).any()) or float(self.weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, D]``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    def _posterior(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Responsibilities ``r [B, K]``, ``a [B, 1, 1]``, ``S^2 [B, K, 1]`` and residual ``x - a mu [B, K, D]``."""
        means, stds, weights = (t.to(x) for t in (self.means, self.stds, self.weights))
        a = (1 - sigma).reshape(-1, 1, 1)
        s2 = a**2 * stds.reshape(1, -1, 1) ** 2 + sigma.reshape(-1, 1, 1) ** 2
        resid = x[:, None, :] - a * means[None]
        logp = weights.log()[None] - resid.pow(2).sum(-1) / (2 * s2[..., 0]) - 0.5 * self.dim * s2[..., 0].log()
        return logp.softmax(dim=1), a, s2, resid

    def flow(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact flow ``v*(x, sigma) = E[eps - x0 | x_sigma = x]`` for ``x [B, D]``, ``sigma`` scalar or ``[B]``."""
        sigma = append_dims(sigma, x).reshape(-1).expand(x.shape[0])
        r, a, s2, resid = self._posterior(x, sigma)
        stds2 = self.stds.to(x).reshape(1, -1, 1) ** 2
        e_eps = sigma.reshape(-1, 1, 1) / s2 * resid
        e_x0 = self.means.to(x)[None] + a * stds2 / s2 * resid
        return (r[..., None] * (e_eps - e_x0)).sum(1)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact posterior mean ``E[x0 | x_sigma = x]`` ``[B, D]``."""
        sigma = append_dims(sigma, x).reshape(-1).expand(x.shape[0])
        r, a, s2, resid = self._posterior(x, sigma)
        e_x0 = self.means.to(x)[None] + a * self.stds.to(x).reshape(1, -1, 1) ** 2 / s2 * resid
        return (r[..., None] * e_x0).sum(1)

    def to_json(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}


def ring8(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal modes on a circle."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full((8,), std), torch.ones(8))


def grid25(spacing: float = 1.0, std: float = 0.08) -> GaussianMixture:
    """A 5x5 grid of equal modes centred on the origin."""
    coords = (torch.arange(5, dtype=torch.float32) - 2) * spacing
    means = torch.cartesian_prod(coords, coords)
    return GaussianMixture(means, torch.full((25,), std), torch.ones(25))


TARGETS = {"ring8": ring8, "grid25": grid25}


def make_target(spec: str) -> GaussianMixture:
    """A preset name (``ring8``, ``grid25``) or a path to a JSON file ``{"means", "stds", "weights"}``."""
    if spec in TARGETS:
        return TARGETS[spec]()
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"target file {spec!r} does not exist")
        data = json.loads(path.read_text())
        missing = {"means", "stds", "weights"} - set(data)
        if missing:
            raise ValueError(f"target file {spec!r} lacks keys {sorted(missing)}")
        return GaussianMixture(torch.tensor(data["means"]), torch.tensor(data["stds"]), torch.tensor(data["weights"]))
    raise ValueError(f"unknown target {spec!r}; choose one of {sorted(TARGETS)} or a .json mixture file")


def gaussian_flow_map(x: Tensor, sigma_t: float, sigma_s: float, mu: Tensor, c: float) -> Tensor:
    """Exact probability-flow map of ``N(mu, c^2 I)`` data from level ``t`` to ``s``: ``[B, D] -> [B, D]``."""
    a_t, a_s = 1 - sigma_t, 1 - sigma_s
    s_t = math.sqrt(a_t**2 * c**2 + sigma_t**2)
    s_s = math.sqrt(a_s**2 * c**2 + sigma_s**2)
    return a_s * mu + (s_s / s_t) * (x - a_t * mu)

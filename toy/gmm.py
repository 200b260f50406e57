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

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from salt_ref.schedule import append_dims

__all__ = [
    "GaussianMixture",
    "ring8",
    "grid25",
    "mix5",
    "make_target",
    "read_mixture_file",
    "target_fingerprint",
    "gaussian_flow_map",
    "TARGETS",
]


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

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior ``r_k(x) = P(k | x0 = x)`` of the clean mixture (``sigma = 0``), ``[N, D] -> [N, K]``."""
        r, *_ = self._posterior(x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        return r

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


def mix5() -> GaussianMixture:
    """Five modes with unequal weights (0.40 ... 0.05) and widths (0.05 ... 0.35): the heaviest mode is narrow,
    a wide one sits next to it, and the rarest mode is far out, so a sampler that lets a wide or heavy mode
    swallow mass (DMD's reverse-KL failure) shows it in the mode shares."""
    means = torch.tensor([[-1.5, 0.0], [0.8, 1.2], [1.2, -1.4], [-0.4, -2.2], [-1.4, 2.2]])
    stds = torch.tensor([0.08, 0.35, 0.15, 0.05, 0.20])
    weights = torch.tensor([0.40, 0.20, 0.20, 0.15, 0.05])
    return GaussianMixture(means, stds, weights)


TARGETS = {"ring8": ring8, "grid25": grid25, "mix5": mix5}


def make_target(spec: str) -> GaussianMixture:
    """A preset name (see ``TARGETS``) or a path to a JSON mixture file (:func:`read_mixture_file`)."""
    if spec in TARGETS:
        return TARGETS[spec]()
    if Path(spec).suffix == ".json":
        return read_mixture_file(spec)
    raise ValueError(f"unknown target {spec!r}; choose one of {sorted(TARGETS)} or a .json mixture file")


_MIXTURE_KEYS = ("means", "stds", "weights")
_JSON_TYPE = {
    type(None): "null",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    bool: "a boolean",
}


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _numbers(src: str, key: str, value: object, k: int, *, positive: bool) -> list[float]:
    """``value`` as ``k`` finite numbers (a single number stands for all ``k``), > 0 or >= 0."""
    items = [value] * k if _is_number(value) else value
    if not isinstance(items, list) or not all(_is_number(v) for v in items):
        raise ValueError(f"target file {src}: {key!r} must be a number or a list of {k} numbers, got {value!r}")
    if len(items) != k:
        raise ValueError(f"target file {src}: {key!r} has {len(items)} entries for {k} means")
    bad = [v for v in items if not math.isfinite(v) or (v <= 0 if positive else v < 0)]
    if bad:
        want = "positive" if positive else "non-negative"
        raise ValueError(f"target file {src}: {key!r} must be finite and {want}, got {bad[0]!r}")
    return [float(v) for v in items]


def read_mixture_file(path: str | Path) -> GaussianMixture:
    """A 2D mixture from a JSON file ``{"means": [[x, y], ...], "stds": [...], "weights": [...]}``.

    ``stds`` and ``weights`` are a number (the same for every mode) or one entry per mean; every value must be
    finite (JSON's ``NaN``/``Infinity`` are refused), stds positive, weights non-negative with a positive sum.
    The means must be 2D points: the toy's metrics and plots are 2D. Any other content raises ``ValueError``
    naming the file and the field.
    """
    src = str(path)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"target file {src!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"target file {src} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        what = _JSON_TYPE.get(type(data), type(data).__name__)
        raise ValueError(f"target file {src}: expected a JSON object {{means, stds, weights}}, got {what}")
    missing = [k for k in _MIXTURE_KEYS if k not in data]
    unknown = sorted(set(data) - set(_MIXTURE_KEYS))
    if missing or unknown:
        raise ValueError(f"target file {src}: missing keys {missing}, unknown keys {unknown}")
    means = data["means"]
    if not isinstance(means, list) or not means:
        raise ValueError(f"target file {src}: 'means' must be a non-empty list of [x, y] points, got {means!r}")
    for i, m in enumerate(means):
        if not isinstance(m, list) or len(m) != 2 or not all(_is_number(v) and math.isfinite(v) for v in m):
            raise ValueError(
                f"target file {src}: 'means'[{i}] must be a 2D point [x, y] of finite numbers (the toy is 2D), "
                f"got {m!r}"
            )
    k = len(means)
    stds = _numbers(src, "stds", data["stds"], k, positive=True)
    weights = _numbers(src, "weights", data["weights"], k, positive=False)
    if sum(weights) <= 0:
        raise ValueError(f"target file {src}: 'weights' must have a positive sum")
    return GaussianMixture(torch.tensor(means, dtype=torch.float32), torch.tensor(stds), torch.tensor(weights))


def target_fingerprint(spec: str) -> str | None:
    """SHA-256 of a mixture file's contents (``None`` for a preset): a resume must see the same mixture, not
    just the same path."""
    if spec in TARGETS:
        return None
    return hashlib.sha256(Path(spec).read_bytes()).hexdigest()


def gaussian_flow_map(x: Tensor, sigma_t: float, sigma_s: float, mu: Tensor, c: float) -> Tensor:
    """Exact probability-flow map of ``N(mu, c^2 I)`` data from level ``t`` to ``s``: ``[B, D] -> [B, D]``."""
    a_t, a_s = 1 - sigma_t, 1 - sigma_s
    s_t = math.sqrt(a_t**2 * c**2 + sigma_t**2)
    s_s = math.sqrt(a_s**2 * c**2 + sigma_s**2)
    return a_s * mu + (s_s / s_t) * (x - a_t * mu)

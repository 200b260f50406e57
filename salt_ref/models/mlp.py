r"""A time-conditioned MLP for the 2D toy: ``v = f_theta(x, t)``, the flow ``eps - x0``.

The timestep ``t = 1000 sigma`` enters through Fourier features
``phi(t) = [cos(2 pi f_j t / 1000), sin(2 pi f_j t / 1000)]`` with log-spaced frequencies ``f_j``,
concatenated with ``x`` and fed through ``depth`` SiLU layers of width ``hidden``.
Used as the trained teacher, the student and the critic. Shapes: ``x [B, D]``, ``t [B]`` -> ``[B, D]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from salt_ref.schedule import t_to_sigma

__all__ = ["MLPConfig", "TimeMLP"]


@dataclass(frozen=True)
class MLPConfig:
    dim: int = 2
    hidden: int = 256
    depth: int = 3
    n_freqs: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


class TimeMLP(nn.Module):
    """``forward(x [B, D], t [B]) -> v [B, D]`` with ``t`` the network timestep in [0, 1000]."""

    def __init__(self, config: MLPConfig = MLPConfig()):
        super().__init__()
        self.config = config
        # Frequencies from 1/8 to 64 cycles over the sigma range: low ones for the coarse shape of the
        # flow, high ones for its sharp change near sigma -> 0.
        freqs = torch.logspace(math.log10(1 / 8), math.log10(64), config.n_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        layers: list[nn.Module] = []
        width = config.dim + 2 * config.n_freqs
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.SiLU()]
            width = config.hidden
        layers.append(nn.Linear(width, config.dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"x must be [B, {self.config.dim}], got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        phase = 2 * math.pi * t_to_sigma(t[:, None]) * self.freqs.to(x)
        return self.net(torch.cat([x, phase.cos(), phase.sin()], dim=1))

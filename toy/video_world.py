r"""A procedural video world with known physics: one coloured disc bouncing in a box.

A clip is ``F`` frames of ``S x S`` RGB pixels in [-1, 1] (background -1). Its state is a centre ``p0 [2]``, a
velocity ``v [2]`` (pixels per frame), a radius ``r`` and the colour of its class ``label`` (the class stands in
for the text prompt, and is visible in every frame). Motion is constant velocity with elastic bounces off the
walls of the box ``[lo, hi] = [r, S - 1 - r]``, in closed form per axis::

    u = (p0 + v t - lo) mod 2L,   L = hi - lo,   p(t) = lo + (u if u <= L else 2L - u)

and a frame is ``-1 + m(x) (c + 1)`` with the soft disc mask ``m(x) = sigmoid((r - |x - p(t)|) / 0.35)``.
Every palette colour has a channel at +1, so ``max_channel((frame + 1) / 2) = m``: the mask, and from it the
centre, radius and colour, can be read back from any frame without a network (see ``toy.video_metrics``).

Shapes: videos ``[N, 3, F, S, S]``; labels ``[N]``; class embeddings ``[N, L, D]`` (text states for Wan).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "PALETTE",
    "VideoWorldConfig",
    "ClipState",
    "sample_states",
    "trajectory",
    "render",
    "sample",
    "class_embedding",
    "null_embedding",
]

# red, green, blue, yellow: each has a channel at +1 (so the mask is readable) and they are far apart
PALETTE = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
EDGE = 0.35  # softness of the disc edge in pixels


@dataclass(frozen=True)
class VideoWorldConfig:
    frames: int = 8
    size: int = 16
    n_classes: int = 4
    radius: tuple[float, float] = (1.8, 2.6)
    speed: tuple[float, float] = (0.6, 1.4)

    def __post_init__(self) -> None:
        if not 1 <= self.n_classes <= len(PALETTE):
            raise ValueError(f"n_classes must be in [1, {len(PALETTE)}], got {self.n_classes}")
        if self.size % 2 or self.size < 8:
            raise ValueError(f"size must be even and >= 8 (patches are 2x2), got {self.size}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")


@dataclass
class ClipState:
    """Per-clip physics: ``p0 [N, 2]`` (x, y), ``v [N, 2]``, ``radius [N]``, ``label [N]``."""

    p0: Tensor
    v: Tensor
    radius: Tensor
    label: Tensor

    @property
    def colour(self) -> Tensor:
        return PALETTE[self.label]


def sample_states(
    n: int, config: VideoWorldConfig, generator: torch.Generator | None = None, label: Tensor | None = None
) -> ClipState:
    """``n`` random clip states (labels drawn uniformly unless given)."""
    g = generator
    r = config.radius[0] + (config.radius[1] - config.radius[0]) * torch.rand(n, generator=g)
    lo, hi = r, config.size - 1 - r
    p0 = lo[:, None] + (hi - lo)[:, None] * torch.rand(n, 2, generator=g)
    angle = 2 * torch.pi * torch.rand(n, generator=g)
    speed = config.speed[0] + (config.speed[1] - config.speed[0]) * torch.rand(n, generator=g)
    v = speed[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    if label is None:
        label = torch.randint(config.n_classes, (n,), generator=g)
    return ClipState(p0, v, r, label.long())


def reflect(p: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Fold unbounded positions into ``[lo, hi]`` by elastic reflection (broadcasting)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def trajectory(state: ClipState, frames: int, size: int) -> Tensor:
    """Centres ``[N, F, 2]`` of the bouncing disc for frames ``0..F-1``."""
    t = torch.arange(frames, dtype=state.p0.dtype)
    lo, hi = state.radius[:, None, None], (size - 1 - state.radius)[:, None, None]
    return reflect(state.p0[:, None] + state.v[:, None] * t[None, :, None], lo, hi)


def disc_mask(centres: Tensor, radius: Tensor, size: int) -> Tensor:
    """Soft masks ``[N, F, S, S]`` of discs at ``centres [N, F, 2]`` with ``radius [N]`` or ``[N, F]``."""
    coords = torch.arange(size, dtype=centres.dtype)
    dx = coords[None, None, None, :] - centres[..., 0, None, None]
    dy = coords[None, None, :, None] - centres[..., 1, None, None]
    rad = radius if radius.ndim == 2 else radius[:, None]
    return torch.sigmoid((rad[..., None, None] - (dx**2 + dy**2).sqrt()) / EDGE)


def render(state: ClipState, frames: int, size: int) -> Tensor:
    """The clips ``[N, 3, F, S, S]`` in [-1, 1]."""
    m = disc_mask(trajectory(state, frames, size), state.radius, size)
    return -1 + m[:, None] * (state.colour[:, :, None, None, None] + 1)


def sample(
    n: int,
    generator: torch.Generator | None = None,
    *,
    config: VideoWorldConfig = VideoWorldConfig(),
    frames: int | None = None,
    label: Tensor | None = None,
) -> tuple[Tensor, Tensor, ClipState]:
    """``(video [n, 3, F, S, S], labels [n], state)``; ``frames`` overrides the config's length."""
    state = sample_states(n, config, generator, label)
    return render(state, frames or config.frames, config.size), state.label, state


def class_embedding(labels: Tensor, dim: int, length: int) -> Tensor:
    """Fixed text-like states ``[N, length, dim]`` per class (a seeded table, identical in every process)."""
    table = torch.randn(len(PALETTE), length, dim, generator=torch.Generator().manual_seed(1234))
    return table[labels.long()]


def null_embedding(dim: int, length: int) -> Tensor:
    """The unconditional state ``[length, dim]`` (zeros) for classifier-free guidance."""
    return torch.zeros(length, dim)


def save_video(video: Tensor, path: str | Path, *, fps: int = 8, scale: int = 4) -> Path:
    """Write clips ``[N, 3, F, S, S]`` side by side as a GIF or MP4 (imageio), upscaled ``scale`` times."""
    import imageio.v2 as imageio

    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, F, S, S]
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    pad = torch.full((*x.shape[:-1], 2), 255, dtype=torch.uint8)
    row = torch.cat([torch.cat([clip, p], dim=-1) for clip, p in zip(x, pad, strict=True)], dim=-1)  # [3, F, H, W']
    frames = row.permute(1, 2, 3, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(path, list(frames), fps=fps)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.video_world", description="write sample clips of the world")
    p.add_argument("--out", default="runs/video_world/clips.gif")
    p.add_argument("--frames", type=int, default=32)
    args = p.parse_args(argv)
    cfg = VideoWorldConfig()
    video, labels, _ = sample(
        2 * cfg.n_classes,
        torch.Generator().manual_seed(0),
        config=cfg,
        frames=args.frames,
        label=torch.arange(2 * cfg.n_classes) % cfg.n_classes,
    )
    print(f"wrote {save_video(video, args.out)}: labels {labels.tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""A procedural video world with known physics: one coloured soft disc bouncing in a box.

A clip is ``F`` frames of ``S x S`` pixels with ``C`` channels in [-1, 1] (background -1). Its state is a start
centre ``p0 = (x, y)`` (pixels), a velocity ``v`` (pixels per frame), a radius ``r`` and a colour ``k`` in
{-1, +1}^C. The class ``label`` stands in for the text prompt and *is the colour*: ``k = palette[label]``, so the
class is visible in every frame (also far past the trained length, where the start of the motion is long gone)
and is read back from any single frame in closed form (``toy.video_metrics``). Motion is independent of the class.

Motion is constant velocity with elastic bounces off the walls ``[lo, hi] = [r, S - 1 - r]`` (the disc touches
the border pixel centres), in closed form per axis by folding the free path::

    q(t) = p0 + v t,   L = hi - lo,   u = (q(t) - lo) mod 2L
    p(t) = lo + u          if u <= L                     (moving with v)
         = lo + 2L - u     otherwise                     (moving with -v: reflected an odd number of times)

A frame is ``x = -1 + m (k + 1)`` with the anti-aliased disc mask ``m(x) = sigmoid((r - |x - p(t)|) / e)``,
``e`` = ``edge`` pixels. Every palette colour has a channel at +1, so ``max_c (x_c + 1) / 2 = m``.

Random states: ``r ~ U[radius]``, ``p0 ~ U[lo, hi]^2``, heading ``~ U[0, 2 pi)``, speed ``~ U[speed]``,
``label ~ U{0..n_classes-1}`` (drawn in this order from one generator, so a seed fixes a clip exactly).

**Tint (appearance only the cache carries).** With ``tint = T > 0`` every clip also draws, last, a per-clip tint
``u ~ U[0, 1]^C``: the channels that are off in the class colour are raised to ``k_c = -1 + T u_c`` (the on
channels stay +1). The tint is not a function of the label, so the prompt says nothing about it: a causal model
that generates a clip chunk by chunk can keep it constant only by reading it back from the frames in its cache,
and a cache written by a blurry or washed-out few-step chunk hands every later chunk a wrong tint. With
``T < 1`` the off channels stay below 0, so the nearest palette colour is still the class. ``T = 0`` is the
original world (same draws, same clips).

Shapes: videos ``[N, C, F, S, S]``; labels ``[N]``; positions ``[N, F, 2]``; class embeddings ``[N, L, D]``
(text states for the Wan model, e.g. ``L = 8``, ``D = 32`` for ``WanConfig.preset("tiny")``).

The world knows nothing of its metrics (``toy.video_metrics`` reads the world, never the other way round); its
demo, ``python -m toy.video_metrics --out runs/video_world``, lives there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "PALETTE",
    "EDGE",
    "VideoWorldConfig",
    "ClipState",
    "palette",
    "sample_states",
    "reflect",
    "trajectory",
    "velocity",
    "disc_mask",
    "render",
    "sample",
    "class_embedding",
    "null_embedding",
    "save_video",
    "save_frame_grid",
    "fold",
]

EDGE = 0.35  # default softness of the disc edge in pixels
_EMBED_SEED = 1234


def palette(channels: int = 3, n_classes: int = 4) -> Tensor:
    """The class colours ``[n_classes, channels]``: distinct codes in {-1, +1}^C with at least one channel on.

    Ordered by the number of channels on, then by position; for ``C = 3``: red, green, blue, yellow, magenta,
    cyan, white. Any two colours differ by 2 in at least one channel, so the nearest colour is unambiguous.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not 1 <= n_classes <= 2**channels - 1:
        raise ValueError(f"n_classes must be in [1, {2**channels - 1}] for {channels} channels, got {n_classes}")
    codes = []
    for on in range(1, channels + 1):
        for idx in itertools.combinations(range(channels), on):
            code = [-1.0] * channels
            for i in idx:
                code[i] = 1.0
            codes.append(code)
    return torch.tensor(codes[:n_classes])


PALETTE = palette(3, 4)  # red, green, blue, yellow


@dataclass(frozen=True)
class VideoWorldConfig:
    """The world: clip length and size, classes, and the ranges random states are drawn from.

    Attributes:
        frames: frames per training clip (generation may ask for any number).
        size: frame height = width ``S`` in pixels (even: the Wan patch is 2x2).
        channels: ``C`` (3 for the Wan ``in_dim``).
        n_classes: number of class labels (= colours), at most ``2^C - 1``.
        radius: ``(min, max)`` disc radius in pixels.
        speed: ``(min, max)`` speed in pixels per frame (heading uniform).
        edge: softness ``e`` of the disc's sigmoid edge in pixels.
        tint: range ``T`` in [0, 1) of the per-clip tint of the off channels (0: the class colour exactly).
    """

    frames: int = 8
    size: int = 16
    channels: int = 3
    n_classes: int = 4
    radius: tuple[float, float] = (1.8, 2.6)
    speed: tuple[float, float] = (0.6, 1.4)
    edge: float = EDGE
    tint: float = 0.0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size % 2 or self.size < 8:
            raise ValueError(f"size must be even and >= 8 (patches are 2x2), got {self.size}")
        palette(self.channels, self.n_classes)  # validates channels and n_classes
        r_lo, r_hi = self.radius
        if not 0 < r_lo <= r_hi or self.size - 1 - 2 * r_hi < 1:
            raise ValueError(f"radius range must satisfy 0 < min <= max < (size - 2) / 2, got {self.radius}")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed range must satisfy 0 <= min <= max, got {self.speed}")
        if self.edge <= 0:
            raise ValueError(f"edge must be positive, got {self.edge}")
        if not 0 <= self.tint < 1:
            raise ValueError(f"tint must be in [0, 1) (off channels stay below 0), got {self.tint}")

    @property
    def palette(self) -> Tensor:
        """The class colours ``[n_classes, channels]``."""
        return palette(self.channels, self.n_classes)


@dataclass
class ClipState:
    """Per-clip physics of ``N`` clips in a box of ``size`` pixels.

    Attributes:
        p0: start centres ``[N, 2]`` as (x, y) = (column, row) in pixels.
        v: velocities ``[N, 2]`` in pixels per frame.
        radius: disc radii ``[N]`` in pixels.
        label: class labels ``[N]`` (long).
        colour: disc colours ``[N, C]`` (``palette[label]``, off channels raised by the tint if the world has one).
        size: side ``S`` of the box in pixels.
    """

    p0: Tensor
    v: Tensor
    radius: Tensor
    label: Tensor
    colour: Tensor
    size: int = 16

    def __post_init__(self) -> None:
        n = self.p0.shape[0]
        shapes = {"p0": (n, 2), "v": (n, 2), "radius": (n,), "label": (n,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {list(getattr(self, name).shape)}")
        if self.colour.ndim != 2 or self.colour.shape[0] != n:
            raise ValueError(f"colour must be [N={n}, C], got {list(self.colour.shape)}")

    def __len__(self) -> int:
        return self.p0.shape[0]


def sample_states(
    n: int,
    config: VideoWorldConfig = VideoWorldConfig(),
    generator: torch.Generator | None = None,
    label: Tensor | None = None,
) -> ClipState:
    """``n`` random clip states; labels are drawn uniformly unless given (``label [n]``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = generator
    r = config.radius[0] + (config.radius[1] - config.radius[0]) * torch.rand(n, generator=g)
    lo, hi = r, config.size - 1 - r
    p0 = lo[:, None] + (hi - lo)[:, None] * torch.rand(n, 2, generator=g)
    angle = 2 * torch.pi * torch.rand(n, generator=g)
    speed = config.speed[0] + (config.speed[1] - config.speed[0]) * torch.rand(n, generator=g)
    v = speed[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    if label is None:
        label = torch.randint(config.n_classes, (n,), generator=g)
    label = torch.as_tensor(label).long()
    if label.shape != (n,) or bool((label < 0).any()) or bool((label >= config.n_classes).any()):
        raise ValueError(f"label must be [n={n}] with values in [0, {config.n_classes}), got {label.tolist()}")
    colour = config.palette[label]
    if config.tint > 0:  # drawn last, so a tint-free world keeps its clips
        u = torch.rand(n, config.channels, generator=g)
        colour = torch.where(colour > 0, colour, -1 + config.tint * u)
    return ClipState(p0, v, r, label, colour, config.size)


def fold(q: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Fold free positions ``q`` into ``[lo, hi]``; also the direction sign (+1 moving with ``v``, -1 against)."""
    span = hi - lo
    u = torch.remainder(q - lo, 2 * span)
    forward = u <= span
    return lo + torch.where(forward, u, 2 * span - u), torch.where(forward, 1.0, -1.0).to(q.dtype)


def reflect(p: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Fold unbounded positions into ``[lo, hi]`` by elastic reflection (broadcasting)."""
    return fold(p, torch.as_tensor(lo, dtype=p.dtype), torch.as_tensor(hi, dtype=p.dtype))[0]


def _free_path(state: ClipState, frames: int, size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    size = state.size if size is None else size
    t = torch.arange(frames, dtype=state.p0.dtype)
    lo, hi = state.radius[:, None, None], (size - 1 - state.radius)[:, None, None]
    return state.p0[:, None] + state.v[:, None] * t[None, :, None], lo, hi


def trajectory(state: ClipState, frames: int, size: int | None = None) -> Tensor:
    """Centres ``[N, F, 2]`` of the bouncing disc at frames ``0..F-1`` (``size`` defaults to ``state.size``)."""
    return fold(*_free_path(state, frames, size))[0]


def velocity(state: ClipState, frames: int, size: int | None = None) -> Tensor:
    """Instantaneous velocities ``[N, F, 2]``: ``v`` with each axis flipped once per wall hit so far."""
    return fold(*_free_path(state, frames, size))[1] * state.v[:, None]


def disc_mask(centres: Tensor, radius: Tensor, size: int, edge: float = EDGE) -> Tensor:
    """Soft masks ``[N, F, S, S]`` of discs at ``centres [N, F, 2]`` with ``radius [N]`` or ``[N, F]``."""
    coords = torch.arange(size, dtype=centres.dtype)
    dx = coords[None, None, None, :] - centres[..., 0, None, None]
    dy = coords[None, None, :, None] - centres[..., 1, None, None]
    rad = radius if radius.ndim == 2 else radius[:, None]
    return torch.sigmoid((rad[..., None, None] - (dx**2 + dy**2).sqrt()) / edge)


def render(state: ClipState, frames: int, size: int | None = None, *, edge: float = EDGE) -> Tensor:
    """The clips ``[N, C, F, S, S]`` in [-1, 1] (``x = -1 + m (k + 1)``)."""
    size = state.size if size is None else size
    m = disc_mask(trajectory(state, frames, size), state.radius, size, edge)
    return -1 + m[:, None] * (state.colour[:, :, None, None, None] + 1)


def sample(
    n: int,
    generator: torch.Generator | None = None,
    *,
    config: VideoWorldConfig = VideoWorldConfig(),
    frames: int | None = None,
    label: Tensor | None = None,
) -> tuple[Tensor, Tensor, ClipState]:
    """``(video [n, C, F, S, S], labels [n], state)`` drawn from ``generator``; ``frames`` overrides the config."""
    frames = config.frames if frames is None else frames
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    state = sample_states(n, config, generator, label)
    return render(state, frames, config.size, edge=config.edge), state.label, state


def class_embedding(labels: Tensor, dim: int, length: int) -> Tensor:
    """Fixed text-like states ``[N, length, dim]`` per class (a seeded ``N(0, 1)`` table, the same in every process).

    Classes 0-3 come from the first draw of the seeded generator and later classes from the draws after it, so a
    class's embedding does not depend on how many classes there are.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or (labels.numel() and int(labels.min()) < 0):
        raise ValueError(f"labels must be a [N] tensor of non-negative integers, got {labels}")
    if dim < 1 or length < 1:
        raise ValueError(f"dim and length must be >= 1, got dim={dim}, length={length}")
    g = torch.Generator().manual_seed(_EMBED_SEED)
    table = [torch.randn(4, length, dim, generator=g)]
    extra = int(labels.max()) + 1 - 4 if labels.numel() else 0
    if extra > 0:
        table.append(torch.randn(extra, length, dim, generator=g))
    return torch.cat(table)[labels.long()]


def null_embedding(dim: int, length: int) -> Tensor:
    """The unconditional state ``[length, dim]`` (zeros) for classifier-free guidance."""
    return torch.zeros(length, dim)


def _to_uint8(video: Tensor, scale: int) -> Tensor:
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, C, F, S, S]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    return x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def save_video(video: Tensor, path: str | Path, *, fps: int = 8, scale: int = 4) -> Path:
    """Write clips ``[N, C, F, S, S]`` side by side as a GIF or MP4 (imageio), upscaled ``scale`` times."""
    import imageio.v2 as imageio

    x = _to_uint8(video, scale)
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


def save_frame_grid(video: Tensor, path: str | Path, *, labels: Tensor | None = None, max_frames: int = 16) -> Path:
    """A PNG grid (matplotlib): one row per clip, one column per frame (the first ``max_frames``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = _to_uint8(video[:, :, :max_frames], 1)  # [N, 3, F, S, S]
    n, _, f = x.shape[:3]
    fig, axes = plt.subplots(n, f, figsize=(0.6 * f, 0.6 * n), squeeze=False)
    for i, j in itertools.product(range(n), range(f)):
        ax = axes[i, j]
        ax.imshow(x[i, :, j].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(str(j), fontsize=6)
        if j == 0 and labels is not None:
            ax.set_ylabel(f"class {int(labels[i])}", fontsize=6)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

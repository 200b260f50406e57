r"""Quality of clips of the video world, measured from its known physics (no network).

**Per frame** (:func:`fit_frames`) the disc model of ``toy.video_world`` is fitted to every frame ``x [C, S, S]``::

    m(c, r)(p) = sigmoid((r - |p - c|) / e),      x_hat = -1 + m (k + 1)

* init: foreground ``w = max_c (x_c + 1) / 2 - median``; centre at the peak of ``w`` matched with a disc, refined
  by the centroid of ``w`` near it; radius from the local mass ``r = sqrt(sum w / pi)``;
* colour in closed form given the mask (least squares per channel, clipped to [-1, 1]):
  ``k + 1 = sum_p m (x + 1) / sum_p m^2``;
* centre and radius by damped Gauss-Newton (Levenberg-Marquardt, 12 steps, a step is kept only where it lowers the
  error) on ``mean (x - x_hat)^2``, the colour re-solved at every step.

That free fit reads the state (centre, radius, colour). The **fidelity** of a frame is the MSE between the frame
and the clean render of the best-fitting disc *the world can draw*: the colour snapped to the nearest palette
colour, the radius kept in the world's range, and centre and radius re-fitted (6 more steps)::

    fidelity_f = min_{c, r in [r_min, r_max]} mean_{C, H, W} (x_f - x_hat(c, r, k_nearest))^2      (lower is better)

It is ~0 for a clean render, grows with noise, blur or artifacts, and is large for a blank frame (the disc is
missing) or a frame with two discs. ``drift_curve`` is its mean over clips by frame index.

**Across frames** (:func:`fit_tracks`) the best physical track -- constant velocity with elastic bounces at the
walls ``[rho, S - 1 - rho]`` -- is fitted to the fitted centres. Per axis, with ``rho`` the clip's median world
radius: a grid over start and velocity (velocity step ``~ L / (4F)``, so the grid stays fine for long clips),
then Gauss-Newton from the 3 best grid points on the folded path, which is piecewise linear:
``d p_t / d(p0, v) = s_t (1, t)`` with ``s_t = +-1`` the direction after the bounces so far. Then Gauss-Newton
on both axes together with ``rho`` free too (``d p_t / d rho = 4j`` going forward, ``-2 - 4j`` coming back, ``j``
the fold count), so a disc drawn a little too large or too small is not counted as a motion error. The
**motion coherence** of a clip is the RMS distance (pixels) between the fitted centres and that track (lower is
better; ~0 for the world's clips, ~0.1 px under noise of std 0.3, ~3 px for frames shuffled in time).

**Class**: the label is the colour, predicted as the palette colour nearest to the clip's median fitted colour.
**Features** ``[N, 7 + C]`` for the Fréchet distance and diversity, in units where each is O(1) (the state's
spread in the world, or for the two quality features a clearly visible error: rms intensity 0.2, one pixel)::

    [start / S (2), velocity px/frame (2), radius px, colour (C), sqrt(mean fidelity) / 0.2, motion coherence px]

``frechet_distance`` is ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` between Gaussian fits
(float64, matrix roots by eigendecomposition). ``diversity`` is the mean pairwise distance of (start / S,
velocity) within a class, averaged over classes.

Shapes: videos ``[N, C, F, S, S]``, labels ``[N]``. Every function takes the world's ``config`` (defaults to
``VideoWorldConfig()``) for its palette, radius range and edge softness.

A demo of world and metrics together is ``python -m toy.world_demo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from toy.video_world import VideoWorldConfig, fold

__all__ = [
    "FrameFit",
    "fit_frames",
    "frame_fidelity",
    "drift_curve",
    "fit_tracks",
    "motion_coherence",
    "predict_labels",
    "class_accuracy",
    "physics_features",
    "frechet_distance",
    "diversity",
    "evaluate_video",
    "world_colour",
    "appearance_error",
    "physics_stats",
    "chunk_steps",
    "patch_grid_tv",
]

_WORLD = VideoWorldConfig()
FREE_STEPS = 12  # Gauss-Newton steps of the free fit (centre, radius; colour in closed form)
WORLD_STEPS = 6  # further steps of the world-constrained fit (palette colour, radius in range)
_CHUNK = 1024  # frames fitted at once
FIDELITY_UNIT = 0.2  # rms intensity error that counts as one unit among the physics features
BOUNCE_MIN_STEP = 0.25  # px: a frame-to-frame step below this along an axis is no motion (physics_stats)
WALL_TOL = 0.5  # px: a centre this close to [r, S - 1 - r] is at the wall (physics_stats)
MAX_SPEED = 2.0  # velocity range searched by the track fit, pixels per frame per axis (the world's is <= 1.4)


@dataclass
class FrameFit:
    """Per-frame fits of ``N`` clips of ``F`` frames.

    Attributes:
        centre: disc centres ``[N, F, 2]`` as (x, y) in pixels (free fit).
        radius: disc radii ``[N, F]`` in pixels (free fit).
        colour: disc colours ``[N, F, C]`` in [-1, 1] (free fit).
        fidelity: MSE ``[N, F]`` between the frame and the clean render of the best world disc.
        label: nearest palette class ``[N, F]`` of each frame's colour.
        world_radius: radius ``[N, F]`` of the best world disc (in the world's range; mass-preserving corruptions
            such as blur leave it near the true radius, so the track fit takes its walls from it).
    """

    centre: Tensor
    radius: Tensor
    colour: Tensor
    fidelity: Tensor
    label: Tensor
    world_radius: Tensor


def _check(video: Tensor, config: VideoWorldConfig) -> None:
    if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[-1] != video.shape[-2]:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"video must be a [N, C, F, S, S] tensor, got {shape}")
    if video.shape[1] != config.channels:
        raise ValueError(f"video has {video.shape[1]} channels, the world {config.channels}: got {tuple(video.shape)}")
    if min(video.shape[0], video.shape[2]) < 1 or video.shape[-1] < 4:
        raise ValueError(f"video must have N >= 1 clips, F >= 1 frames and S >= 4, got {tuple(video.shape)}")


def _check_labels(labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [N={n}], got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


class _Disc:
    """Vectorised disc fit over ``B`` frames ``y [B, C, P]`` (``P = S * S`` pixels, stored as ``y + 1``)."""

    def __init__(self, frames: Tensor, edge: float):
        b, c, s, _ = frames.shape
        self.size, self.edge = s, edge
        self.y1 = (frames + 1).reshape(b, c, s * s)
        coords = torch.arange(s, dtype=frames.dtype)
        self.px = coords.repeat(s)  # column index of pixel p
        self.py = coords.repeat_interleave(s)  # row index of pixel p

    def mask(self, centre: Tensor, radius: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dx = self.px - centre[:, :1]
        dy = self.py - centre[:, 1:]
        d = (dx**2 + dy**2 + 1e-12).sqrt()
        return torch.sigmoid((radius[:, None] - d) / self.edge), dx, dy, d

    def amplitude(self, m: Tensor) -> Tensor:
        """Least-squares ``k + 1 [B, C]`` given the mask, clipped to [0, 2]."""
        num = (self.y1 * m[:, None]).sum(-1)
        return (num / (m**2).sum(-1, keepdim=True).clamp_min(1e-8)).clamp(0, 2)

    def error(self, m: Tensor, a: Tensor) -> Tensor:
        return (self.y1 - m[:, None] * a[..., None]).pow(2).mean(dim=(1, 2))

    def fit(
        self,
        centre: Tensor,
        radius: Tensor,
        steps: int,
        *,
        colour: Tensor | None = None,
        r_range: tuple[float, float] = (0.3, math.inf),
        in_box: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Levenberg-Marquardt on ``(cx, cy, r)``; ``colour [B, C]`` fixed if given. Returns (c, r, colour, mse).

        The centre stays in ``[-1, S]``, or with ``in_box`` in the world's box ``[r, S - 1 - r]``.
        """
        lo, hi = r_range[0], min(r_range[1], self.size / 2)

        def clamp_centre(c: Tensor, r: Tensor) -> Tensor:
            if not in_box:
                return c.clamp(-1.0, self.size)
            return torch.minimum(torch.maximum(c, r[:, None]), self.size - 1 - r[:, None])

        def evaluate(c: Tensor, r: Tensor) -> tuple[Tensor, ...]:
            m, dx, dy, d = self.mask(c, r)
            a = self.amplitude(m) if colour is None else colour + 1
            return m, dx, dy, d, a, self.error(m, a)

        radius = radius.clamp(lo, hi)
        centre = clamp_centre(centre, radius)
        m, dx, dy, d, a, err = evaluate(centre, radius)
        damping = torch.full_like(err, 1e-2)
        eye = torch.eye(3, dtype=centre.dtype)
        for _ in range(steps):
            g = m * (1 - m) / self.edge  # dm/dr; dm/dc = g (p - c) / d
            jac = torch.stack([g * dx / d, g * dy / d, g], dim=-1)  # [B, P, 3]
            hess = (a**2).sum(-1)[:, None, None] * jac.transpose(1, 2) @ jac
            res = ((self.y1 - m[:, None] * a[..., None]) * a[..., None]).sum(1)  # [B, P]
            grad = (res[:, :, None] * jac).sum(1)  # [B, 3]
            hess = hess + damping[:, None, None] * torch.diag_embed(hess.diagonal(dim1=1, dim2=2)) + 1e-6 * eye
            step = torch.linalg.solve(hess, grad)
            step = step / step.norm(dim=-1, keepdim=True).clamp_min(1.0)  # at most one pixel per step
            r_new = (radius + step[:, 2]).clamp(lo, hi)
            c_new = clamp_centre(centre + step[:, :2], r_new)
            m_new, dx_new, dy_new, d_new, a_new, err_new = evaluate(c_new, r_new)
            ok = err_new < err
            centre = torch.where(ok[:, None], c_new, centre)
            radius = torch.where(ok, r_new, radius)
            m, dx, dy, d = (
                torch.where(ok[:, None], new, old) for new, old in ((m_new, m), (dx_new, dx), (dy_new, dy), (d_new, d))
            )
            a = torch.where(ok[:, None], a_new, a)
            err = torch.where(ok, err_new, err)
            damping = torch.where(ok, damping / 3, damping * 4).clamp(1e-6, 1e6)
        return centre, radius, a - 1, err


def _init_disc(frames: Tensor, config: VideoWorldConfig) -> tuple[Tensor, Tensor]:
    """Centre ``[B, 2]`` and radius ``[B]`` to start the fit from (``frames [B, C, S, S]``)."""
    s = frames.shape[-1]
    m0 = ((frames.clamp(-1, 1) + 1) / 2).amax(dim=1)  # [B, S, S]
    w = (m0 - m0.flatten(1).median(dim=1).values[:, None, None]).clamp_min(0)
    r_mid = sum(config.radius) / 2
    k = math.ceil(r_mid + 1)
    grid = torch.arange(-k, k + 1, dtype=frames.dtype)
    kernel = torch.sigmoid((r_mid - (grid[None] ** 2 + grid[:, None] ** 2).sqrt()) / config.edge)
    score = F.conv2d(w[:, None], kernel[None, None], padding=k)[:, 0]  # [B, S, S]
    peak = score.flatten(1).argmax(dim=1)
    coords = torch.arange(s, dtype=frames.dtype)
    px, py = (peak % s).to(frames.dtype), (peak // s).to(frames.dtype)
    near = (coords[None, None, :] - px[:, None, None]) ** 2 + (coords[None, :, None] - py[:, None, None]) ** 2
    w = w * (near <= (config.radius[1] + 1.5) ** 2)
    mass = w.sum(dim=(1, 2))
    safe = mass.clamp_min(1e-6)
    cx = torch.where(mass > 1e-6, (w * coords[None, None, :]).sum(dim=(1, 2)) / safe, px)
    cy = torch.where(mass > 1e-6, (w * coords[None, :, None]).sum(dim=(1, 2)) / safe, py)
    radius = (mass / math.pi).sqrt().clamp(config.radius[0] / 2, s / 2)
    return torch.stack([cx, cy], dim=-1), radius


def world_colour(colour: Tensor, label: Tensor, config: VideoWorldConfig = _WORLD) -> Tensor:
    """The colour ``[..., C]`` nearest to ``colour`` that the world draws for class ``label [...]``: the class's on
    channels at +1, its off channels clamped to the tint range ``[-1, -1 + tint]`` (exactly -1 without a tint)."""
    pal = config.palette.to(colour.dtype)[label]
    return torch.where(pal > 0, pal, colour.clamp(-1.0, -1.0 + config.tint))


def fit_frames(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> FrameFit:
    """Fit the disc to every frame of ``video [N, C, F, S, S]``: state read back and fidelity (see module doc)."""
    _check(video, config)
    n, c, f, s, _ = video.shape
    frames = video.detach().float().permute(0, 2, 1, 3, 4).reshape(n * f, c, s, s)
    palette = config.palette.to(frames.dtype)
    parts = []
    for chunk in frames.split(_CHUNK):  # chunks that stay in cache: ~3x faster than one big batch
        disc = _Disc(chunk, config.edge)
        centre, radius, colour, _ = disc.fit(*_init_disc(chunk, config), FREE_STEPS)
        label = torch.cdist(colour, palette).argmin(dim=1)
        world = disc.fit(
            centre, radius, WORLD_STEPS, colour=world_colour(colour, label, config), r_range=config.radius, in_box=True
        )
        parts.append((centre, radius, colour, world[3], label, world[1]))
    centre, radius, colour, fidelity, label, world_radius = (torch.cat(x) for x in zip(*parts, strict=True))
    return FrameFit(
        centre=centre.reshape(n, f, 2),
        radius=radius.reshape(n, f),
        colour=colour.reshape(n, f, c),
        fidelity=fidelity.reshape(n, f),
        label=label.reshape(n, f),
        world_radius=world_radius.reshape(n, f),
    )


def frame_fidelity(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> Tensor:
    """Per-frame fidelity ``[N, F]``: MSE to the best clean world disc (lower is better; ~0 for a clean render)."""
    return fit_frames(video, config=config).fidelity


def drift_curve(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> Tensor:
    """Mean fidelity by frame index ``[F]`` (read it far past the trained length)."""
    return frame_fidelity(video, config=config).mean(dim=0)


def _damped_step(jac: Tensor, res: Tensor) -> Tensor:
    """Gauss-Newton step ``(J^T J + lam I)^-1 J^T r`` per row of ``jac [M, K, P]``, ``res [M, K]``.

    The damping is relative to the diagonal's scale: an absolute one vanishes in float32 next to ``sum t^2`` and a
    parameter without effect (a wall offset when the track never bounces) leaves ``J^T J`` singular. A row whose
    system still fails takes no step (the caller keeps only steps that lower the error).
    """
    hess = jac.transpose(1, 2) @ jac
    diag = hess.diagonal(dim1=-2, dim2=-1)
    lam = 1e-6 * diag.mean(-1).clamp_min(1.0)
    hess = hess + lam[:, None, None] * torch.eye(hess.shape[-1], dtype=hess.dtype)
    step, info = torch.linalg.solve_ex(hess, (jac * res[..., None]).sum(1))
    return torch.where((info == 0)[:, None] & step.isfinite().all(-1, keepdim=True), step, torch.zeros_like(step))


def _fit_axis(obs: Tensor, lo: Tensor, hi: Tensor, max_speed: float) -> tuple[Tensor, Tensor]:
    """Best ``(p0 [M], v [M])`` of folded tracks to ``obs [M, F]`` with walls ``lo, hi [M]`` (grid, then GN)."""
    m, f = obs.shape
    t = torch.arange(f, dtype=obs.dtype)
    span = (hi - lo).clamp_min(0.5)
    n_p = 25
    n_v = int(min(max(8 * max_speed * f / float(span.min()) + 1, 41), 801))
    p_grid = lo[:, None] + span[:, None] * torch.linspace(0, 1, n_p, dtype=obs.dtype)  # [M, P]
    v_grid = torch.linspace(-max_speed, max_speed, n_v, dtype=obs.dtype)  # [V]
    top = 3
    chunk = max(1, 4_000_000 // (n_p * n_v * f))
    cands = []
    for i in range(0, m, chunk):
        sl = slice(i, i + chunk)
        q = p_grid[sl, :, None, None] + v_grid[None, None, :, None] * t  # [m, P, V, F]
        pos = fold(q, lo[sl, None, None, None], hi[sl, None, None, None])[0]
        err = (pos - obs[sl, None, None]).pow(2).mean(-1).flatten(1)  # [m, P * V]
        best = err.topk(top, dim=1, largest=False).indices
        cands.append(torch.stack([p_grid[sl].gather(1, best // n_v), v_grid[best % n_v]], dim=-1))  # [m, top, 2]
    cand = torch.cat(cands).reshape(m * top, 2)
    p, v = cand[:, 0], cand[:, 1]
    o, lo_, hi_ = obs.repeat_interleave(top, 0), lo.repeat_interleave(top), hi.repeat_interleave(top)

    def evaluate(p: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pos, sign = fold(p[:, None] + v[:, None] * t, lo_[:, None], hi_[:, None])
        res = o - pos
        return res, sign, res.pow(2).mean(-1)

    res, sign, err = evaluate(p, v)
    for _ in range(10):
        jac = torch.stack([sign, sign * t], dim=-1)  # [M', F, 2]
        step = _damped_step(jac, res)
        p_new, v_new = p + step[:, 0], (v + step[:, 1]).clamp(-2 * max_speed, 2 * max_speed)
        res_new, sign_new, err_new = evaluate(p_new, v_new)
        ok = err_new < err
        p, v = torch.where(ok, p_new, p), torch.where(ok, v_new, v)
        res, sign = torch.where(ok[:, None], res_new, res), torch.where(ok[:, None], sign_new, sign)
        err = torch.where(ok, err_new, err)
    best = err.reshape(m, top).argmin(dim=1)
    idx = torch.arange(m) * top + best
    start, s0 = fold(p[idx], lo, hi)
    return start, v[idx] * s0


def fit_tracks(fit: FrameFit, size: int, *, max_speed: float = MAX_SPEED) -> tuple[Tensor, Tensor, Tensor]:
    """Best bouncing track per clip: ``(start [N, 2], velocity [N, 2] at frame 0, track [N, F, 2])``.

    Per axis a grid search and Gauss-Newton with the walls at the clip's median world radius, then Gauss-Newton on
    both axes together with the wall offset ``rho`` (the disc bounces at ``[rho, S - 1 - rho]``) free as well.
    """
    n, f, _ = fit.centre.shape
    rho = fit.world_radius.median(dim=1).values.clamp(0.5, (size - 2) / 2)  # [N]
    obs = fit.centre.permute(0, 2, 1).reshape(2 * n, f)  # rows: clip 0 x, clip 0 y, clip 1 x, ...
    rho2 = rho.repeat_interleave(2)
    start, vel = _fit_axis(obs, rho2, size - 1 - rho2, max_speed)
    p0, v = start.reshape(n, 2), vel.reshape(n, 2)
    t = torch.arange(f, dtype=obs.dtype)[None, :, None]  # [1, F, 1]

    def evaluate(p0: Tensor, v: Tensor, rho: Tensor) -> tuple[Tensor, ...]:
        q = p0[:, None] + v[:, None] * t  # [N, F, 2]
        span = (size - 1 - 2 * rho)[:, None, None]
        w = q - rho[:, None, None]
        j = torch.floor(w / (2 * span))
        pos, sign = fold(q, rho[:, None, None], size - 1 - rho[:, None, None])
        d_rho = torch.where(sign > 0, 4 * j, -2 - 4 * j)
        res = fit.centre - pos
        return res, sign, d_rho, res.pow(2).sum(-1).mean(-1)

    res, sign, d_rho, err = evaluate(p0, v, rho)
    for _ in range(10 if f > 2 else 0):
        zero = torch.zeros_like(sign[..., 0])
        jx = torch.stack([sign[..., 0], zero, sign[..., 0] * t[..., 0], zero, d_rho[..., 0]], dim=-1)  # [N, F, 5]
        jy = torch.stack([zero, sign[..., 1], zero, sign[..., 1] * t[..., 0], d_rho[..., 1]], dim=-1)
        jac = torch.cat([jx, jy], dim=1)  # [N, 2F, 5]
        r = torch.cat([res[..., 0], res[..., 1]], dim=1)  # [N, 2F]
        step = _damped_step(jac, r)
        p0_new, v_new = p0 + step[:, :2], v + step[:, 2:4]
        rho_new = (rho + step[:, 4]).clamp(0.5, (size - 2) / 2)
        res_new, sign_new, d_rho_new, err_new = evaluate(p0_new, v_new, rho_new)
        ok = err_new < err
        p0, v, rho = (
            torch.where(ok[:, None], p0_new, p0),
            torch.where(ok[:, None], v_new, v),
            torch.where(ok, rho_new, rho),
        )
        res, sign, d_rho = (
            torch.where(ok[:, None, None], a, b) for a, b in ((res_new, res), (sign_new, sign), (d_rho_new, d_rho))
        )
        err = torch.where(ok, err_new, err)
    track = fit.centre - res
    return track[:, 0], v * sign[:, 0], track


def _coherence(fit: FrameFit, track: Tensor) -> Tensor:
    return (fit.centre - track).pow(2).sum(-1).mean(-1).sqrt()


def motion_coherence(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> Tensor:
    """RMS distance ``[N]`` (pixels) between the fitted centres and the best physical bouncing track."""
    fit = fit_frames(video, config=config)
    return _coherence(fit, fit_tracks(fit, video.shape[-1])[2])


def _predict(fit: FrameFit, config: VideoWorldConfig) -> Tensor:
    colour = fit.colour.median(dim=1).values  # [N, C]
    return torch.cdist(colour, config.palette.to(colour.dtype)).argmin(dim=1)


def predict_labels(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> Tensor:
    """Class ``[N]`` read from the clip: the palette colour nearest to the median fitted colour."""
    return _predict(fit_frames(video, config=config), config)


def class_accuracy(video: Tensor, labels: Tensor, *, config: VideoWorldConfig = _WORLD) -> float:
    """Share of clips whose read-back class (colour) is their label."""
    labels = _check_labels(labels, video.shape[0])
    return float((predict_labels(video, config=config) == labels).float().mean())


def _features(fit: FrameFit, size: int) -> Tensor:
    start, vel, track = fit_tracks(fit, size)
    return torch.cat(
        [
            start / size,
            vel,
            fit.radius.median(dim=1).values[:, None],
            fit.colour.median(dim=1).values,
            fit.fidelity.mean(dim=1, keepdim=True).sqrt() / FIDELITY_UNIT,
            _coherence(fit, track)[:, None],
        ],
        dim=1,
    )


def physics_features(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> Tensor:
    """``[N, 7 + C]``: start / S (2), velocity (2), radius, colour (C), rms fidelity / 0.2, motion coherence."""
    return _features(fit_frames(video, config=config), video.shape[-1])


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of ``feat_a [N, K]`` and ``feat_b [M, K]`` (float64, >= 0)."""
    if feat_a.ndim != 2 or feat_b.ndim != 2 or feat_a.shape[1] != feat_b.shape[1]:
        raise ValueError(f"need two [N, K] feature sets of equal K, got {tuple(feat_a.shape)}, {tuple(feat_b.shape)}")
    if min(feat_a.shape[0], feat_b.shape[0]) < 2:
        raise ValueError(f"need at least 2 rows per set, got {feat_a.shape[0]} and {feat_b.shape[0]}")
    a, b = feat_a.double(), feat_b.double()
    if not (a.isfinite().all() and b.isfinite().all()):
        raise ValueError("features must be finite")

    def sqrtm(m: Tensor) -> Tensor:
        w, q = torch.linalg.eigh((m + m.T) / 2)
        return (q * w.clamp_min(0).sqrt()) @ q.T

    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root = sqrtm(s_a)
    cross = sqrtm(root @ s_b @ root)
    fd = (a.mean(0) - b.mean(0)).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross)
    return max(float(fd), 0.0)


def _diversity(features: Tensor, labels: Tensor) -> float:
    values = [torch.pdist(features[labels == c][:, :4]).mean() for c in labels.unique() if (labels == c).sum() > 1]
    return float(torch.stack(values).mean()) if values else 0.0


def diversity(video: Tensor, labels: Tensor | None = None, *, config: VideoWorldConfig = _WORLD) -> float:
    """Mean pairwise distance of (start / S, velocity) within a class, averaged over classes (higher: more diverse).

    ``labels [N]`` default to the classes read back from the clips. About 1.4 for the world's own clips.
    """
    fit = fit_frames(video, config=config)
    labels = _predict(fit, config) if labels is None else _check_labels(labels, video.shape[0])
    return _diversity(_features(fit, video.shape[-1]), labels)


def _appearance(fit: FrameFit, ref_fit: FrameFit, chunk_frames: int) -> Tensor:
    ref = ref_fit.colour[:, :chunk_frames].median(dim=1).values  # [N, C]
    return (fit.colour[:, chunk_frames:] - ref[:, None]).norm(dim=-1)  # [N, F - chunk]


def appearance_error(
    video: Tensor, chunk_frames: int, *, reference: Tensor | None = None, config: VideoWorldConfig = _WORLD
) -> Tensor:
    """How far later chunks stray from the appearance the first chunk set: ``[N, F - chunk_frames]``.

    Per frame ``f >= chunk_frames``: ``|k_f - k_ref|`` (L2 over channels), with ``k_f`` the frame's fitted colour
    and ``k_ref`` the median fitted colour of the first ``chunk_frames`` frames of ``reference`` (default: the
    video itself; the cache-quality experiment passes what was *written into the cache*). In the tinted world the
    tint is drawn per clip and the prompt does not carry it, so a causal generator keeps it only by copying it from
    its cache; a world clip scores 0 (its colour is constant), a generator that forgets or washes out the tint
    scores up to ``tint * sqrt(C - 1)``.
    """
    _check(video, config)
    if not 1 <= chunk_frames < video.shape[2]:
        raise ValueError(f"chunk_frames must be in [1, F={video.shape[2]}), got {chunk_frames}")
    reference = video if reference is None else reference
    if reference.shape[:2] != video.shape[:2] or reference.shape[2] < chunk_frames:
        raise ValueError(f"reference {tuple(reference.shape)} does not match video {tuple(video.shape)}")
    fit = fit_frames(video, config=config)
    ref_fit = fit if reference is video else fit_frames(reference[:, :, :chunk_frames], config=config)
    return _appearance(fit, ref_fit, chunk_frames)


def _stats(fit: FrameFit, size: int) -> dict[str, float]:
    c = fit.centre  # [N, F, 2]
    d = c[:, 1:] - c[:, :-1]  # [N, F-1, 2]
    speed = d.norm(dim=-1).median(dim=1).values  # per clip: robust to the frames of a bounce
    moving = d.abs() > BOUNCE_MIN_STEP
    sign = torch.where(moving, d.sign(), torch.zeros_like(d))
    flips = (sign[:, 1:] * sign[:, :-1] < 0).float().sum(dim=(1, 2))  # reversals of an axis' direction
    rho = fit.world_radius[..., None]
    at_wall = ((c - rho).abs() < WALL_TOL) | ((size - 1 - rho - c).abs() < WALL_TOL)  # [N, F, 2]
    step = d.abs()
    into = torch.cat([step[:, :1], step], dim=1)  # the step into frame f (frame 0: the step out of it)
    out = torch.cat([step, step[:, -1:]], dim=1)  # the step out of frame f (last frame: the step into it)
    still = torch.maximum(into, out) < BOUNCE_MIN_STEP
    stuck = (at_wall & still).any(-1).float()  # at a wall and not moving off it
    frames = c.shape[1]
    return {
        "speed": float(speed.mean()),
        "radius": float(fit.radius.median(dim=1).values.mean()),
        "bounces": float(flips.mean() * 10 / max(frames - 2, 1)),
        "stuck": float(stuck.mean()),
    }


def physics_stats(video: Tensor, *, config: VideoWorldConfig = _WORLD) -> dict[str, float]:
    """The look of the motion, to set next to the world's own: all from the per-frame fits, no track model.

    ``speed``: mean over clips of the median frame-to-frame displacement of the fitted centre (px/frame);
    ``radius``: mean of the clips' median fitted radius (px); ``bounces``: reversals of an axis' direction of
    motion (steps over 0.25 px) per clip per 10 frames; ``stuck``: share of frames where the disc sits at a
    wall (within 0.5 px of ``[r, S - 1 - r]``) and moves less than 0.25 px along that axis into and out of the frame
    (a disc that slides into a wall and stays there; elastic bounces leave at once).
    """
    return _stats(fit_frames(video, config=config), video.shape[-1])


def _chunk_steps(fit: FrameFit, chunk_frames: int) -> dict[str, float]:
    d = (fit.centre[:, 1:] - fit.centre[:, :-1]).norm(dim=-1)  # [N, F-1]: step f goes from frame f to f + 1
    f = torch.arange(1, d.shape[1] + 1)  # the frame each step ends at
    across = (f % chunk_frames) == 0  # into the first frame of a chunk
    interior = (f > 1) & (f < d.shape[1])  # neither the clip's first step nor its last
    out = {}
    for name, mask in (("step_within", interior & ~across), ("step_across", interior & across)):
        if mask.any():
            out[name] = float(d[:, mask].median())  # pooled: both groups get the same estimator
    return out


def chunk_steps(video: Tensor, *, chunk_frames: int, config: VideoWorldConfig = _WORLD) -> dict[str, float]:
    """How a chunk-wise generator moves the disc: inside its chunks and from one chunk to the next.

    With ``c_f`` the fitted centre of frame ``f`` and ``d_f = |c_{f+1} - c_f|`` (px), ``step_within`` is the median
    of ``d_f`` over every clip's steps inside a chunk (``(f + 1) mod chunk_frames != 0``) and ``step_across`` the
    median over the steps into a new chunk (pooled over clips: a per-clip median of 2 steps against one of 3 would
    read a bounce differently in the two groups). The clip's first and last steps are left out of
    both: a network that sees the whole clip moves its disc least at the clip's ends, which would otherwise count
    as inside a chunk. For the world's clips both are the speed; a student whose frames within a chunk barely move
    and that jumps between chunks has ``step_within`` well below ``step_across``. A key is left out when the clip
    has no interior step of its kind (``chunk_frames`` 1, or one chunk, or fewer than 4 frames).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    return _chunk_steps(fit_frames(video, config=config), chunk_frames)


def patch_grid_tv(video: Tensor, patch: int, *, config: VideoWorldConfig = _WORLD, bins: int = 8) -> float:
    """Whether the discs sit at preferred places on a network's ``patch x patch`` token grid (0: anywhere).

    With ``c`` the fitted centres ``[N, F, 2]`` (px): the total variation between the histogram of ``c mod patch``
    (``bins`` bins per patch, both axes pooled) and the uniform one. The world's discs sit anywhere, so its clips
    score the sampling noise of the histogram only (about 0.08 for 64 clips of 8 frames); a network whose discs
    snap to its token grid, and then stick and jump from one place to the next, scores more.
    """
    if patch < 1 or bins < 1:
        raise ValueError(f"patch and bins must be >= 1, got {patch} and {bins}")
    c = fit_frames(video, config=config).centre.remainder(patch).flatten()
    hist = torch.histc(c, bins=bins, min=0, max=patch)
    return float(0.5 * (hist / hist.sum() - 1 / bins).abs().sum())


def evaluate_video(
    video: Tensor,
    labels: Tensor,
    reference_video: Tensor,
    *,
    config: VideoWorldConfig = _WORLD,
    chunk_frames: int = 2,
) -> dict[str, float]:
    """Every metric of ``video [N, C, F, S, S]`` with ``labels [N]`` against ``reference_video`` (world clips).

    Returns ``fidelity`` (mean per-frame MSE), ``motion`` (mean RMS px), ``class_acc``, ``diversity``,
    ``frechet`` (physics features of ``video`` against those of ``reference_video``), ``appearance`` (mean
    :func:`appearance_error` after the first ``chunk_frames`` frames; 0 for clips of at most one chunk) and the
    :func:`physics_stats` (``speed``, ``radius``, ``bounces``, ``stuck``) and :func:`chunk_steps`
    (``step_within``, ``step_across``).
    """
    labels = _check_labels(labels, video.shape[0])
    fit = fit_frames(video, config=config)
    ref = fit_frames(reference_video, config=config)
    feats = _features(fit, video.shape[-1])
    appearance = _appearance(fit, fit, chunk_frames) if video.shape[2] > chunk_frames else torch.zeros(1)
    return {
        "fidelity": float(fit.fidelity.mean()),
        "motion": float(feats[:, -1].mean()),
        "class_acc": float((_predict(fit, config) == labels).float().mean()),
        "diversity": _diversity(feats, labels),
        "frechet": frechet_distance(feats, _features(ref, reference_video.shape[-1])),
        "appearance": float(appearance.mean()),
        **_stats(fit, video.shape[-1]),
        **_chunk_steps(fit, chunk_frames),
    }

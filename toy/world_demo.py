"""Demo of the video world and its metrics: ``python -m toy.world_demo --out runs/video_world``.

Writes a GIF and a PNG frame grid of a few clips per class, then prints the metrics (``toy.video_metrics``) of
clean clips, of clips with added noise (rms 0.2) and of frame-shuffled clips, each against other clips of the
world: fidelity and class accuracy see the noise, motion coherence sees the shuffle. The world is the small setup's
(tinted, ``--tint``); a clip whose tint is swapped for another clip's after the first chunk shows the tint drift.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from toy import video_world as vw
from toy.setup_video import WORLD_TINT
from toy.video_metrics import evaluate_video
from toy.video_world import VideoWorldConfig

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.world_demo", description="write sample clips and their metrics")
    p.add_argument("--out", default="runs/video_world", help="output folder (clips.gif, frames.png)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tint", type=float, default=WORLD_TINT, help="per-clip tint range (0: the untinted world)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = VideoWorldConfig(tint=args.tint)
    out = Path(args.out)
    labels = torch.arange(cfg.n_classes).repeat(args.per_class)
    g = torch.Generator().manual_seed(args.seed)
    video, labels, _ = vw.sample(len(labels), g, config=cfg, frames=args.frames, label=labels)
    gif, grid = vw.save_video(video, out / "clips.gif"), vw.save_frame_grid(video, out / "frames.png", labels=labels)
    print(f"wrote {gif} and {grid}")

    n = 64
    g = torch.Generator().manual_seed(args.seed + 1)
    clean, lab, _ = vw.sample(n, g, config=cfg, frames=args.frames)
    ref, _, _ = vw.sample(n, g, config=cfg, frames=args.frames)
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=g)
    shuffled = clean[:, :, torch.randperm(args.frames, generator=g)]
    swapped = clean.clone()  # from frame 2 on, the next clip's tint (same motion, same class colour channels)
    on = (cfg.palette[lab] > 0)[:, :, None, None, None]
    mask = ((clean + 1) / 2).amax(dim=1, keepdim=True)
    colour = torch.where(
        on, 1.0, _state_colour(clean, mask).roll(1, 0).clamp(max=-1 + cfg.tint)[:, :, None, None, None]
    )
    other = -1 + mask * (colour + 1)
    swapped[:, :, 2:] = other[:, :, 2:]
    print(f"{n} clips x {args.frames} frames of {cfg.size}x{cfg.size}; reference: {n} other clips of the world")
    for name, v in (("clean", clean), ("noise 0.2", noisy), ("shuffled", shuffled), ("tint swapped", swapped)):
        res = evaluate_video(v, lab, ref, config=cfg)
        print(f"{name:>10}: " + "  ".join(f"{k} {val:.4g}" for k, val in res.items()))
    return 0


def _state_colour(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-clip colour ``[N, C]`` of clean renders (``x + 1 = m (k + 1)``, read at the mask's brightest pixel)."""
    n, c = video.shape[:2]
    idx = mask.flatten(1).argmax(dim=1)
    return video.flatten(2).gather(2, idx[:, None, None].expand(n, c, 1))[..., 0]


if __name__ == "__main__":
    raise SystemExit(main())

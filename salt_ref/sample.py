r"""Generate videos of any length with a causal student, chunk by chunk through the KV cache.

Each chunk of ``chunk_frames`` latent frames is denoised along the few-step list (re-noise sampler, as trained)
while attending to the cache; its output is written into the cache by the context pass. With a bounded memory
policy and window-relative RoPE the cost per chunk stays flat and generation runs past the trained length::

    python -m salt_ref.sample --run runs/small-salt --frames 32 --memory window:6 --rope relative --out v.gif

Shapes: ``context [B, L, D]``; output ``[B, C, F, H, W]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from salt_ref.cache_condition import chunked_rollout
from salt_ref.schedule import denoising_sigmas, randn_like

__all__ = ["generate", "generate_without_cache", "main"]


@torch.no_grad()
def generate(
    model: nn.Module,
    context: Tensor,
    *,
    frames: int,
    size: tuple[int, int],
    steps: int = 4,
    shift: float = 5.0,
    memory: str = "full",
    rope: str = "absolute",
    generator: torch.Generator | None = None,
    return_times: bool = False,
) -> Tensor | tuple[Tensor, list[float]]:
    """A ``[B, C, frames, H, W]`` video from a causal ``model`` conditioned on ``context``.

    With ``return_times`` also the wall-clock seconds of each chunk (flat under bounded memory policies).
    """
    cfg = model.config
    if not cfg.causal:
        raise ValueError("generate() needs a causal model (WanConfig(causal=True))")
    noise = torch.randn(context.shape[0], cfg.in_dim, frames, *size, generator=generator)
    ro = chunked_rollout(
        model,
        noise.to(context),
        denoising_sigmas(steps, shift).to(context),
        context,
        chunk_frames=cfg.chunk_frames,
        policy=memory,
        rope=rope,
        generator=generator,
        grad_exit=False,
    )
    return (ro.x0, ro.chunk_seconds) if return_times else ro.x0


@torch.no_grad()
def generate_without_cache(
    model: nn.Module,
    context: Tensor,
    *,
    frames: int,
    size: tuple[int, int],
    steps: int = 4,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The reference that the cache speeds up: every step of chunk ``c`` re-runs the whole prefix (earlier chunks
    clean at ``t = 0``, the current chunk at its level) through one block-causal forward, full memory."""
    cfg = model.config
    sigmas = denoising_sigmas(steps, shift).to(context)
    b = context.shape[0]
    # the same draws, in the same order, as generate(): whole-video noise, then per chunk its re-noising and the
    # context pass's (unused at level 0) noise, so the two are comparable sample for sample
    noise = torch.randn(b, cfg.in_dim, frames, *size, generator=generator).to(context)
    done = noise[:, :, :0]
    for s in range(0, frames, cfg.chunk_frames):
        e = min(s + cfg.chunk_frames, frames)
        x = noise[:, :, s:e]
        for k in range(steps):
            t = torch.cat([torch.zeros(b, s, dtype=sigmas.dtype), sigmas[k].cpu().expand(b, e - s)], dim=1)
            v = model(torch.cat([done, x], dim=2), t.to(context) * 1000.0, context)[:, :, s:e]
            x0 = x - sigmas[k] * v
            if k + 1 < steps:
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * randn_like(x0, generator)
        randn_like(x0, generator)
        done = torch.cat([done, x0], dim=2)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m salt_ref.sample", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a small-scale run directory (config.json + checkpoint)")
    p.add_argument("--frames", type=int, default=None, help="frames to generate (default: the trained length)")
    p.add_argument("--memory", default=None, help="full, window:N or sink:S+window:N (default: the run's)")
    p.add_argument("--rope", choices=["absolute", "relative"], default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--label", type=int, nargs="+", default=None, help="class label(s) to generate (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .gif or .mp4 (default: <run>/sample.gif)")
    args = p.parse_args(argv)
    from toy.setup_video import load_run
    from toy.video_world import save_video

    try:
        model, cfg, prompts = load_run(Path(args.run))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_classes = prompts.world.n_classes
    if args.label is not None and not all(0 <= k < n_classes for k in args.label):
        print(f"error: --label must be in 0..{n_classes - 1}, got {args.label}", file=sys.stderr)
        return 2
    labels = torch.tensor(args.label or list(range(n_classes)))
    frames = args.frames or cfg.frames
    g = torch.Generator().manual_seed(args.seed)
    try:
        video = generate(
            model,
            prompts.embed(labels),
            frames=frames,
            size=(cfg.size, cfg.size),
            steps=args.steps,
            memory=args.memory or cfg.memory,
            rope=args.rope or cfg.rope,
            generator=g,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.run) / "sample.gif")
    save_video(video, out)
    print(f"wrote {out}: {len(labels)} clips x {frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())

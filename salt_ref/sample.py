r"""Command line: videos of any length from a trained small-scale run (``salt_ref.generate`` does the work).

Generation is chunk-wise through the KV cache, along the run's recipe (its shift and inference list); with a
bounded memory policy and window-relative RoPE the cost per chunk stays flat and it runs past the trained length::

    python -m salt_ref.sample --run runs/small-salt --frames 32 --memory window:6 --rope relative --out v.gif

Bad input (a missing run, an unparsable ``--memory``, a label out of range, ``--frames`` or ``--steps`` < 1)
prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from salt_ref.cli import Parser, memory_policy, positive_int
from salt_ref.generate import generate

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m salt_ref.sample", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a small-scale run directory (config.json + checkpoint)")
    p.add_argument("--frames", type=positive_int, default=None, help="frames to generate (default: the trained length)")
    p.add_argument(
        "--memory", type=memory_policy, default=None, help="full, window:N or sink:S+window:N (default: the run's)"
    )
    p.add_argument("--rope", choices=["absolute", "relative"], default=None)
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the run's recipe)")
    p.add_argument("--label", type=int, nargs="+", default=None, help="class label(s) to generate (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .gif or .mp4 (default: <run>/sample.gif)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # one error: line, code 2, returned like the other failures
        return int(e.code or 0)
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
            recipe=cfg.recipe,
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

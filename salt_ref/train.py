"""Command line: ``python -m salt_ref.train --scale {toy,small,full} ...`` (``--scale S --help``: its flags).

- ``toy``: 2D Gaussian mixtures, ``[--method dmd|sc-dmd|cd] [--target ring8|grid25|mix.json]``;
- ``small``: the procedural video world with tiny Wan models, ``[--method self-forcing|sc-dmd|salt]
  [--memory full|window|sink|window:N|sink:S+window:N]`` (teacher and student init are trained once and cached);
- ``full``: the Salt recipe on Wan 2.1 under ``torchrun`` with FSDP2 (``salt_ref.full``).

Every scale runs through the same loop (``salt_ref.loop.train``); this file only turns flags into a setup.
Bad input (unknown method or target, negative iters, an unwritable out dir, a checkpoint from another config on
``--resume``) prints one ``error:`` line and exits with code 2. A NaN/inf during training exits with code 1 and
names the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from salt_ref.cli import Parser, memory_policy
from salt_ref.recipe import PRESETS

__all__ = ["main", "build_parser"]

SCALES = ("toy", "small", "full")


def _scale_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    p.add_argument("--scale", choices=SCALES, default="toy")
    return p


def build_parser(scale: str = "toy") -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m salt_ref.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="toy",
        help="toy: 2D mixtures; small: the toy video world (CPU); full: Wan 2.1 with FSDP2 under torchrun",
    )
    if scale == "full":
        from salt_ref.full import add_arguments

        add_arguments(p)
        return p
    if scale == "small":
        _small_arguments(p)
        return p
    p.add_argument("--method", choices=["dmd", "sc-dmd", "cd"], default="sc-dmd")
    p.add_argument("--target", default="ring8", help="ring8, grid25, or a .json mixture {means, stds, weights}")
    p.add_argument(
        "--teacher",
        choices=["exact", "mlp"],
        default="exact",
        help="exact Gaussian-mixture flow, or an MLP fitted to it by flow matching",
    )
    from toy.setup_2d import TOY_LOOP

    p.add_argument("--iters", type=int, default=TOY_LOOP["iters"], help="generator iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default runs/toy-<method>-<target>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--critic-ratio", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--lr-gen", type=float, default=TOY_LOOP["lr_gen"])
    p.add_argument("--lr-critic", type=float, default=TOY_LOOP["lr_critic"])
    p.add_argument("--sc-weight", type=float, default=PRESETS["toy"].sc_weight, help="lambda of the SC term (sc-dmd)")
    p.add_argument(
        "--sc-target",
        choices=["live", "ema"],
        default=PRESETS["toy"].sc_target,
        help="network giving v2 in the SC target: the live student or its EMA",
    )
    p.add_argument(
        "--pretrain-iters",
        type=int,
        default=1500,
        help="regression steps that fit the student/critic initialisation to the teacher",
    )
    p.add_argument("--ckpt-every", type=int, default=TOY_LOOP["ckpt_every"])
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _writable_dir(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"cannot write to output directory {str(path)!r}: {e.strerror or e}"
    return None


def _launch(out: Path, threads: int, call):
    """Run ``call()`` into ``out``: ``(None, result)``, or ``(exit code, None)`` after one ``error:`` line."""
    import torch

    from salt_ref.checkpoint import CheckpointMismatchError
    from salt_ref.loop import NonFiniteLossError

    if (msg := _writable_dir(out)) is not None:
        return _fail(msg), None
    torch.set_num_threads(threads)
    try:
        return None, call()
    except (CheckpointMismatchError, FileNotFoundError) as e:
        return _fail(str(e)), None
    except NonFiniteLossError as e:
        return _fail(f"training diverged: {e}", code=1), None


def _run_toy(args: argparse.Namespace) -> int:
    import torch

    from salt_ref.plots import plot_losses, scatter_panels
    from toy.gmm import make_target
    from toy.setup_2d import Toy2DConfig, run, toy_loop

    try:
        gmm = make_target(args.target)
        cfg = Toy2DConfig(
            method=args.method,
            target=args.target,
            teacher=args.teacher,
            batch=args.batch,
            recipe=PRESETS["toy"].replace(sc_weight=args.sc_weight, sc_target=args.sc_target),
            seed=args.seed,
            pretrain_iters=args.pretrain_iters,
        )
        loop_cfg = toy_loop(
            args.seed,
            iters=args.iters,
            critic_ratio=args.critic_ratio,
            lr_gen=args.lr_gen,
            lr_critic=args.lr_critic,
            ckpt_every=args.ckpt_every,
        )
    except ValueError as e:
        return _fail(str(e))
    out = Path(args.out or f"runs/toy-{args.method}-{Path(args.target).stem}-s{args.seed}")
    t0 = time.perf_counter()
    # A 256-wide MLP gains nothing from a second intra-op thread, and on a shared 2-core machine the
    # spin-waiting of an oversubscribed thread pool costs more than the work itself.
    code, result = _launch(out, 1, lambda: run(cfg, loop_cfg, out, resume=args.resume, progress=not args.no_progress))
    if code is not None:
        return code
    _, final = result
    target = gmm.sample(cfg.eval_samples, torch.Generator().manual_seed(0)).numpy()
    panels = {"target": target, **{f"{k} step{'s' if k > 1 else ''}": v.numpy() for k, v in final["samples"].items()}}
    scatter_panels(panels, out / "samples.png", title=f"{args.method} on {args.target} (EMA student)")
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    m = final["metrics"]
    summary = {
        k: {"energy": round(v["energy"], 4), "modes": v["modes"], "hq": round(v["hq_share"], 3)}
        for k, v in m.items()
        if k.isdigit()
    }
    print(
        json.dumps(
            {
                "out": str(out),
                "seconds": round(time.perf_counter() - t0, 1),
                "steps": summary,
                "composition_defect": round(m["composition_defect"]["ddim"], 4),
            }
        )
    )
    return 0


# The bounded policies of the small-scale benchmark (half the 8-frame trained length in the window).
SMALL_MEMORY_SHORTHANDS = {"window": "window:4", "sink": "sink:2+window:4"}


def _small_memory(spec: str):
    return memory_policy(SMALL_MEMORY_SHORTHANDS.get(spec, spec))


def _small_arguments(p: argparse.ArgumentParser) -> None:
    from salt_ref.video_task import VIDEO_METHODS

    p.add_argument("--method", choices=list(VIDEO_METHODS), default="salt")
    p.add_argument(
        "--memory",
        type=_small_memory,
        default="full",
        help="KV cache: full, window:N or sink:S+window:N (frames); window and sink alone mean "
        + " and ".join(SMALL_MEMORY_SHORTHANDS.values()),
    )
    p.add_argument("--rope", choices=["absolute", "relative"], default="absolute")
    p.add_argument("--iters", type=int, default=150, help="generator iterations of the distillation")
    p.add_argument("--teacher-iters", type=int, default=2000, help="flow-matching steps of the (cached) teacher")
    p.add_argument("--ode-iters", type=int, default=300, help="ODE-regression steps of the (cached) student init")
    p.add_argument("--lr-gen", type=float, default=1e-4)
    p.add_argument("--lr-critic", type=float, default=2e-4)
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument(
        "--align-start",
        type=int,
        default=PRESETS["small"].align_start,
        help="generator iteration from which Salt's alignment is on",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default runs/small-<method>-<memory>-s<seed>)")
    p.add_argument("--cache", default="runs/cache", help="where the teacher and the student init are cached")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--no-progress", action="store_true")


def _run_small(args: argparse.Namespace) -> int:

    from toy.run_video import run
    from toy.setup_video import SmallVideoConfig, distill_loop

    try:
        cfg = SmallVideoConfig(
            method=args.method,
            memory=args.memory,
            rope=args.rope,
            teacher_iters=args.teacher_iters,
            ode_iters=args.ode_iters,
            recipe=PRESETS["small"].replace(align_start=args.align_start),
            seed=args.seed,
        )
        loop_cfg = distill_loop(
            args.iters,
            args.seed,
            lr_gen=args.lr_gen,
            lr_critic=args.lr_critic,
            critic_ratio=args.critic_ratio,
            ckpt_every=args.ckpt_every,
        )
    except ValueError as e:
        return _fail(str(e))
    memory = str(args.memory).replace(":", "").replace("+", "_")
    out = Path(args.out or f"runs/small-{args.method}-{memory}-s{args.seed}")
    t0 = time.perf_counter()
    code, final = _launch(
        out,
        2,
        lambda: run(cfg, loop_cfg, out, resume=args.resume, progress=not args.no_progress, cache_dir=Path(args.cache)),
    )
    if code is not None:
        return code
    summary = {h: {k: round(v, 4) for k, v in m.items()} for h, m in final["metrics"].items()}
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 1), "metrics": summary}))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:  # a bad flag is one error: line and code 2, returned (not raised) so callers and tests see the code
        scale = _scale_parser().parse_known_args(argv)[0].scale
        args = build_parser(scale).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if scale == "full":
        from salt_ref import full

        return full.main(args)
    if args.iters < 0:
        return _fail(f"--iters must be >= 0, got {args.iters}")
    if scale == "small":
        return _run_small(args)
    if args.ckpt_every < 1:
        return _fail(f"--ckpt-every must be >= 1, got {args.ckpt_every}")
    return _run_toy(args)


if __name__ == "__main__":
    sys.exit(main())

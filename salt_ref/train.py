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
import os
import sys
import time
from pathlib import Path

from salt_ref.cli import Parser, memory_policy, non_negative_int, positive_int
from salt_ref.recipe import PRESETS

__all__ = ["main", "build_parser"]

SCALES = ("toy", "small", "full")

DESCRIPTIONS = {
    "toy": "Distil a 2D Gaussian-mixture teacher into a 1-4 step student (seconds on a CPU). These are the toy "
    "scale's flags; the other scales have their own: --scale small --help, --scale full --help.",
    "small": "Salt in miniature on the toy video world with tiny Wan models (minutes on a CPU): a teacher and the "
    "student's ODE init, each trained once and cached under --cache, then the distillation into --out.",
    "full": "The Salt recipe on Wan 2.1 with FSDP2, launched with torchrun (see docs/full_scale.md).",
}
EPILOG = (
    "Exit codes: 0 done; 2 bad input, a refused --out (another run's checkpoint, a live run's lock), a damaged "
    "checkpoint or a full disk, each as one 'error:' line; 1 training diverged (the message names the last good "
    "checkpoint)."
)
# What a run writes into --out besides the loop's checkpoint and log: cleared before a fresh run, so a folder
# never holds two runs' files (the checkpoint and metrics.jsonl the loop clears itself).
RUN_FILES = ("final_metrics.json", "samples.png", "loss.png", "drift.png", "config.json", "samples_*x.gif")


def _scale_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    p.add_argument("--scale", choices=SCALES, default="toy")
    return p


def _common_arguments(p: argparse.ArgumentParser, default_out: str, threads: str) -> None:
    """The flags every CPU scale shares: where the run goes, resume or start over, threads, the progress bar."""
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of every training draw")
    p.add_argument("--out", default=None, help=f"output folder (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --out that holds another run's checkpoint, deleting that run's files "
        "(without it such a folder is refused)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help=f"torch CPU threads (default: {threads})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(scale: str = "toy") -> argparse.ArgumentParser:
    p = Parser(prog="python -m salt_ref.train", description=DESCRIPTIONS[scale], epilog=EPILOG)
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
    from toy.gmm import TARGETS
    from toy.setup_2d import TOY_LOOP, Toy2DConfig

    p.add_argument(
        "--method",
        choices=["dmd", "sc-dmd", "cd"],
        default="sc-dmd",
        help="dmd: distribution matching; sc-dmd: DMD plus the self-consistency term; cd: consistency distillation",
    )
    p.add_argument(
        "--target",
        default="ring8",
        help=f"the mixture: {', '.join(TARGETS)}, or a .json file {{means: [[x, y], ...], stds, weights}}",
    )
    p.add_argument(
        "--teacher",
        choices=["exact", "mlp"],
        default="exact",
        help="exact Gaussian-mixture flow, or an MLP fitted to it by flow matching",
    )
    p.add_argument(
        "--recipe",
        choices=["toy", "toy-video"],
        default="toy",
        help="toy: the recipe made for 2D (shift 1, see toy.sweep_2d); toy-video: the video recipe (shift 5) on 2D",
    )
    p.add_argument(
        "--init",
        choices=["ode", "flow"],
        default="ode",
        help="the student's start: regression on the teacher's ODE pairs, or the critic's flow fit",
    )
    p.add_argument("--iters", type=non_negative_int, default=TOY_LOOP["iters"], help="generator iterations")
    p.add_argument("--batch", type=positive_int, default=256, help="samples per iteration")
    p.add_argument("--critic-ratio", type=non_negative_int, default=5, help="critic updates per generator update")
    p.add_argument("--lr-gen", type=float, default=TOY_LOOP["lr_gen"], help="generator learning rate (AdamW)")
    p.add_argument("--lr-critic", type=float, default=TOY_LOOP["lr_critic"], help="critic learning rate (AdamW)")
    p.add_argument("--sc-weight", type=float, default=PRESETS["toy"].sc_weight, help="lambda of the SC term (sc-dmd)")
    p.add_argument(
        "--sc-target",
        choices=["live", "ema"],
        default=PRESETS["toy"].sc_target,
        help="network giving v2 in the SC target: the live student or its EMA",
    )
    p.add_argument(
        "--pretrain-iters",
        type=non_negative_int,
        default=Toy2DConfig.pretrain_iters,
        help="regression steps that fit the critic (and the student's start) to the teacher's flow",
    )
    p.add_argument(
        "--ode-iters",
        type=non_negative_int,
        default=Toy2DConfig.ode_iters,
        help="regression steps of the ODE init: the student's endpoints onto the teacher's ODE endpoints (--init ode)",
    )
    p.add_argument(
        "--ckpt-every",
        type=positive_int,
        default=TOY_LOOP["ckpt_every"],
        help="write the checkpoint every N iterations (and at the end)",
    )
    _common_arguments(
        p,
        "runs/toy-<method>-<target>-s<seed>",
        "1, or OMP_NUM_THREADS if set: a 256-wide MLP gains nothing from more",
    )
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


def _claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run on another run's checkpoint unless ``overwrite``; clear an old run's files before one."""
    from salt_ref.checkpoint import CHECKPOINT_NAME, CheckpointMismatchError, read_header

    ckpt = out / CHECKPOINT_NAME
    if resume:
        return
    if ckpt.exists() and not overwrite:
        try:
            held = f"at iteration {read_header(ckpt)['iteration']}"
        except Exception:  # a damaged one is still another run's: name it without reading it
            held = "(unreadable)"
        raise CheckpointMismatchError(
            f"{out} holds another run's checkpoint {held}; continue it with --resume, start over with --overwrite "
            "(deletes that run's files), or use another --out"
        )
    for pattern in RUN_FILES:
        for path in out.glob(pattern):
            path.unlink()


def _launch(out: Path, threads: int | None, resume: bool, overwrite: bool, call):
    """Run ``call()`` into ``out`` under its run lock: ``(None, result)``, or ``(exit code, None)`` after one
    ``error:`` line. An ``out`` this call created is removed again if the run left nothing in it."""
    import errno

    import torch

    from salt_ref.checkpoint import CheckpointMismatchError, CheckpointWriteError
    from salt_ref.loop import NonFiniteLossError
    from salt_ref.run_lock import RunLock

    if resume and overwrite:
        return _fail("--resume continues the run in --out, --overwrite deletes it: give one of them"), None
    created = not out.exists()
    if (msg := _writable_dir(out)) is not None:
        return _fail(msg), None
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with RunLock(out):  # held over the whole run: clearing old files, training, writing the results
            _claim(out, resume, overwrite)
            return None, call()
    except (CheckpointMismatchError, FileNotFoundError, CheckpointWriteError) as e:
        return _fail(str(e)), None
    except NonFiniteLossError as e:
        return _fail(f"training diverged: {e}", code=1), None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        return _fail(f"no space left on device in {out} while writing {e.filename or 'the run'}"), None
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


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
            recipe=PRESETS[args.recipe].replace(sc_weight=args.sc_weight, sc_target=args.sc_target),
            seed=args.seed,
            pretrain_iters=args.pretrain_iters,
            ode_iters=args.ode_iters,
            init=args.init,
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

    def work() -> dict:
        _, final = run(cfg, loop_cfg, out, resume=args.resume, progress=not args.no_progress)
        target = gmm.sample(cfg.eval_samples, torch.Generator().manual_seed(0)).numpy()
        steps = {f"{k} step{'s' if k > 1 else ''}": v.numpy() for k, v in final["samples"].items()}
        title = f"{args.method} on {args.target}, seed {args.seed}"
        scatter_panels({"target": target, **steps}, out / "samples.png", title=f"{title} (EMA student)")
        if final["iterations"] > 0:  # --iters 0 evaluates the initialisation: there is no loss to plot
            plot_losses(out / "metrics.jsonl", out / "loss.png", title=title)
        return final

    # A 256-wide MLP gains nothing from a second intra-op thread, and on a shared 2-core machine the
    # spin-waiting of an oversubscribed thread pool costs more than the work itself: 1 unless told otherwise.
    threads = args.threads or (None if "OMP_NUM_THREADS" in os.environ else 1)
    code, final = _launch(out, threads, args.resume, args.overwrite, work)
    if code is not None:
        return code
    m = final["metrics"]
    summary = {
        k: {"energy": round(v["energy"], 4), "mode_tv": round(v["mode_tv"], 3), "modes": v["modes"]}
        for k, v in m.items()
        if k.isdigit()
    }
    print(
        json.dumps(
            {
                "out": str(out),
                "seconds": round(time.perf_counter() - t0, 1),
                "steps": summary,
                "teacher_50_ddim": {k: round(final["reference"]["teacher"][k], 4) for k in ("energy", "mode_tv")},
                "data_floor": {k: round(final["reference"]["data"][k], 4) for k in ("energy", "mode_tv")},
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
    from toy.setup_video import SmallVideoConfig, add_teacher_argument

    p.add_argument(
        "--method",
        choices=list(VIDEO_METHODS),
        default="salt",
        help="self-forcing: DMD over chunk-wise rollouts; sc-dmd: plus self-consistency; salt: plus feature alignment",
    )
    p.add_argument(
        "--memory",
        type=_small_memory,
        default="full",
        help="KV cache: full, window:N or sink:S+window:N (frames, at least a chunk of "
        f"{SmallVideoConfig.chunk_frames}); window and sink alone mean "
        + " and ".join(SMALL_MEMORY_SHORTHANDS.values()),
    )
    p.add_argument(
        "--rope",
        choices=["absolute", "relative"],
        default="absolute",
        help="absolute: positions from the video's start; relative: from the memory window's (runs past the "
        "trained length)",
    )
    p.add_argument("--iters", type=non_negative_int, default=150, help="generator iterations of the distillation")
    p.add_argument(
        "--teacher-iters",
        type=non_negative_int,
        default=SmallVideoConfig.teacher_iters,
        help="flow-matching steps of the teacher (trained once, cached under --cache)",
    )
    add_teacher_argument(p)
    p.add_argument(
        "--batch",
        type=positive_int,
        default=SmallVideoConfig.batch,
        help="clips per generator and per critic update of the distillation",
    )
    p.add_argument(
        "--ode-iters",
        type=non_negative_int,
        default=SmallVideoConfig.ode_iters,
        help="ODE-regression steps of the student init (trained once, cached under --cache)",
    )
    p.add_argument("--lr-gen", type=float, default=1e-4, help="generator learning rate (AdamW)")
    p.add_argument("--lr-critic", type=float, default=2e-4, help="critic learning rate (AdamW)")
    p.add_argument("--critic-ratio", type=non_negative_int, default=5, help="critic updates per generator update")
    p.add_argument(
        "--align-start",
        type=non_negative_int,
        default=PRESETS["small"].align_start,
        help="generator iteration from which Salt's alignment is on",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=PRESETS["small"].cfg_scale,
        help="cond + s (cond - uncond): the teacher's guidance in DMD's real score and in the ODE init's "
        "trajectories (each scale caches its own init)",
    )
    p.add_argument(
        "--shift",
        type=float,
        default=PRESETS["small"].shift,
        help="the recipe's grid shift: DMD's noise levels, the sampling lists and the ODE init's DDIM grid "
        "(each shift caches its own init)",
    )
    p.add_argument("--cache", default="runs/cache", help="where the teacher and the student init are cached")
    p.add_argument(
        "--ckpt-every", type=positive_int, default=25, help="write the checkpoint every N iterations (and at the end)"
    )
    _common_arguments(p, "runs/small-<method>-<memory>-s<seed>", "torch's: OMP_NUM_THREADS if set, else the cores")


def _resume_check(out: Path, resume: bool, part: dict) -> None:
    """On ``--resume``, refuse other settings before the teacher and the init train (minutes), not after."""
    from salt_ref.checkpoint import CHECKPOINT_NAME, check_setup_part

    if resume and (out / CHECKPOINT_NAME).exists():
        check_setup_part(out / CHECKPOINT_NAME, part)


def _run_small(args: argparse.Namespace) -> int:
    from toy.run_video import run
    from toy.setup_video import SmallVideoConfig, distill_loop

    try:
        cfg = SmallVideoConfig(
            method=args.method,
            memory=args.memory,
            rope=args.rope,
            teacher_iters=args.teacher_iters,
            teacher=args.teacher,
            batch=args.batch,
            ode_iters=args.ode_iters,
            recipe=PRESETS["small"].replace(align_start=args.align_start, cfg_scale=args.cfg_scale, shift=args.shift),
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
        args.threads,  # torch's default otherwise: it honours OMP_NUM_THREADS
        args.resume,
        args.overwrite,
        lambda: (
            _resume_check(out, args.resume, {"small": cfg.to_dict()})
            or run(cfg, loop_cfg, out, resume=args.resume, progress=not args.no_progress, cache_dir=Path(args.cache))
        ),
    )
    if code is not None:
        return code
    summary = {h: {k: round(v, 4) for k, v in m.items()} for h, m in final["metrics"].items()}
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 1), "metrics": summary}))
    return 0


def _method_hint(argv: list[str], scale: str) -> str | None:
    """Where a ``--method`` of another scale belongs (``--method salt`` without ``--scale small``)."""
    from salt_ref.video_task import VIDEO_METHODS

    for i, a in enumerate(argv):
        if a.startswith("--method="):
            value = a.split("=", 1)[1]
        elif a == "--method" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        if scale == "toy" and value in VIDEO_METHODS and value != "sc-dmd":  # sc-dmd exists at every scale
            return f"--method {value} is a video method: add --scale small (or --scale full)"
        if scale != "toy" and value in ("dmd", "cd"):
            return f"--method {value} is a 2D toy method: use --scale toy"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a bad flag is one error: line and code 2, returned (not raised) so callers and tests see the code
        scale = _scale_parser().parse_known_args(argv)[0].scale
        if (hint := _method_hint(argv, scale)) is not None:
            return _fail(hint)
        args = build_parser(scale).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if scale == "full":
        from salt_ref import full

        if (
            not (args.dry_run or args.resume or args.overwrite)
            and (Path(args.out) / "checkpoint" / "meta.json").exists()
        ):
            return _fail(
                f"{args.out} holds another run's checkpoint; continue it with --resume, start over with --overwrite "
                "(deletes it), or use another --out"
            )
        return full.main(args)
    if scale == "small":
        return _run_small(args)
    return _run_toy(args)


if __name__ == "__main__":
    sys.exit(main())

r"""``python -m salt_ref.train --scale full``: the Salt recipe on Wan 2.1 with FSDP2, through the shared loop.

Launch with ``torchrun --nproc_per_node N -m salt_ref.train --scale full --student S --critic C --teacher T
--prompts P``. Each rank holds a 1/N shard of every network (``fully_shard`` per block, then the root), computes
in bf16 with fp32 master weights and fp32 gradient reduction, recomputes block activations in the backward
(activation checkpointing), and accumulates ``total_batch / (N * batch_per_gpu)`` micro-batches per update.
Checkpoints are sharded (``torch.distributed.checkpoint``) and resumable; rank 0 logs JSONL and shows tqdm.

The memory per GPU that ``--dry-run`` prints is :func:`salt_ref.memory_plan.plan` (its formula is there).

Units: ``--iters`` counts generator updates; each is followed by ``--critic-ratio`` (5) critic updates. The
released Self-Forcing and Salt code count *critic* updates ("steps": the generator trains every 5th), so their
600-step budget is 120 of our iterations (the default of ``self-forcing`` and ``sc-dmd``), Salt's alignment start
``mmd_start_step: 1000`` is ``--align-start 200`` and the EMA's start step 200 is ``--ema-start 40``. Salt's own
budget is not in its release; the ``salt`` default of 400 (as many iterations after the alignment starts as
before) is this project's choice (``RECIPE_ITERS``).

Every feature switch (activation checkpointing, bf16 autocast, FSDP2's mixed-precision policy) is a flag with
the same default on every device. Without CUDA only the ``tiny`` preset runs (the CPU proof of this code path,
gloo backend); larger presets exit with a one-line message, and ``--dry-run`` builds all three models on the meta
device and prints the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from salt_ref.checkpoint import CheckpointMismatchError
from salt_ref.cli import boolean, memory_policy, non_negative_int, positive_int
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import DCPCheckpointer, LoopConfig, NonFiniteLossError, train
from salt_ref.memory_plan import model_configs, parse_latent, plan
from salt_ref.models.wan import WanConfig, WanModel, load_checkpoint
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.video_task import VIDEO_METHODS, EmbeddingPrompts, VideoDistillTask, VideoTaskConfig

__all__ = [
    "add_arguments",
    "recipe_from_args",
    "shard",
    "build_model",
    "ema_factory",
    "join_process_group",
    "FullRun",
    "start",
    "main",
]

# Generator iterations (each then 5 critic updates). Self-Forcing's published budget is 600 steps of its loop,
# which counts critic updates: 120 of ours. Salt's alignment starts at its step 1000 (200 of ours), so Salt trains
# longer than that, by an amount its release does not state; our default gives the alignment as many iterations
# after its start as before it (2 x 200), a choice of this project, not a published number.
RECIPE_ITERS = {"self-forcing": 120, "sc-dmd": 120, "salt": 400}
EMA_START = 40  # Self-Forcing / Salt: EMA from step 200 = generator iteration 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and data")
    g.add_argument("--student", help="student init checkpoint (ODE-initialised causal Wan; .safetensors, index or dir)")
    g.add_argument("--critic", help="critic init checkpoint (Wan2.1-T2V-1.3B)")
    g.add_argument("--teacher", help="teacher checkpoint (Wan2.1-T2V-14B or 1.3B)")
    g.add_argument(
        "--prompts", help="precomputed text states: safetensors with 'context' [N,L,4096], 'negative' [L,4096]"
    )
    g.add_argument("--model", choices=["tiny", "1.3B"], default="1.3B", help="student and critic size")
    g.add_argument("--teacher-model", choices=["tiny", "1.3B", "14B"], default="14B", help="teacher size")
    g = p.add_argument_group("recipe")
    g.add_argument(
        "--method",
        choices=list(VIDEO_METHODS),
        default="salt",
        help="self-forcing: DMD over chunk-wise rollouts; sc-dmd: plus self-consistency; salt: plus feature alignment",
    )
    g.add_argument("--causal", type=boolean, default=True, help="false: bidirectional student (non-AR SC-DMD)")
    g.add_argument(
        "--memory", type=memory_policy, default=MemoryPolicy(), help="KV-cache policy: full, window:N, sink:S+window:N"
    )
    g.add_argument("--latent", default="16x21x60x104", help="latent C x F x H x W (480x832, 81 frames)")
    g.add_argument("--chunk-frames", type=int, default=WanConfig().chunk_frames, help="latent frames per chunk")
    wan = PRESETS["wan"]
    g.add_argument("--cfg-scale", type=float, default=wan.cfg_scale, help="teacher CFG (cond + s (cond - uncond))")
    g.add_argument(
        "--align-start",
        type=int,
        default=wan.align_start,
        help="generator iteration the alignment starts (Salt's mmd_start_step 1000 counts critic updates: 200 here)",
    )
    g.add_argument("--align-block", type=int, default=wan.align_block, help="teacher block whose features are aligned")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--iters",
        type=int,
        default=None,
        help="generator iterations, each followed by --critic-ratio critic updates (the released code's 'steps' "
        f"count critic updates: divide them by 5); default per method {RECIPE_ITERS}",
    )
    g.add_argument("--total-batch", type=positive_int, default=64, help="videos per generator update, all ranks")
    g.add_argument(
        "--batch-per-gpu", type=positive_int, default=1, help="videos per micro-batch and rank (the rest accumulates)"
    )
    g.add_argument("--lr-gen", type=float, default=2e-6, help="generator learning rate (AdamW)")
    g.add_argument("--lr-critic", type=float, default=4e-7, help="critic learning rate (AdamW)")
    g.add_argument("--critic-ratio", type=non_negative_int, default=5, help="critic updates per generator update")
    g.add_argument(
        "--ema-start", type=int, default=EMA_START, help="generator iteration the EMA starts (released: step 200)"
    )
    g.add_argument(
        "--ckpt-every", type=positive_int, default=50, help="write the sharded checkpoint every N iterations"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every training draw")
    g.add_argument("--out", default="runs/full", help="output folder (checkpoint/, metrics.jsonl)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (a DCP folder is trusted input: resume only your own)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --out that holds another run's checkpoint, deleting it",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("running")
    g.add_argument("--dry-run", action="store_true", help="build on the meta device, print the plan, exit 0")
    g.add_argument("--gpus", type=int, default=None, help="GPU count for the --dry-run plan (default: world size)")
    g.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute block activations in the backward (every device, the CPU included)",
    )
    g.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 compute (autocast; FSDP2 bf16 parameter gather, fp32 gradient reduce) with fp32 master "
        "weights, and the frozen teacher stored in bf16 (every device, the CPU included)",
    )


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The run's recipe: the released Wan preset with the recipe flags applied (the method's terms come later)."""
    return PRESETS["wan"].replace(cfg_scale=args.cfg_scale, align_start=args.align_start, align_block=args.align_block)


def shard(model: WanModel, mixed: bool) -> None:
    """FSDP2 ``fully_shard`` per block then the root; bf16 gather and fp32 gradient reduce when ``mixed``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def build_model(
    cfg: WanConfig,
    path: str | None,
    device: torch.device,
    distributed: bool,
    mixed: bool,
    checkpointing: bool,
    frozen: bool = False,
) -> WanModel:
    """A Wan model of ``cfg`` built on the meta device, sharded (``distributed``), materialised on ``device`` and
    loaded from ``path``; a ``frozen`` model (the teacher) is stored in bf16 when ``mixed``."""
    with torch.device("meta"):
        model = WanModel(cfg)
    if frozen:
        model.requires_grad_(False)
        if mixed:  # nothing trains it, so it needs no fp32 master copy: bf16 halves its shard
            model.to(torch.bfloat16)
    if distributed:
        shard(model, mixed)
    model.to_empty(device=device)
    if path is None:
        raise ValueError("every model needs a checkpoint (--student, --critic, --teacher)")
    load_checkpoint(model, path)
    model.gradient_checkpointing = checkpointing
    return model


def ema_factory(cfg: WanConfig, student: nn.Module, device: torch.device, distributed: bool, mixed: bool):
    """``make() -> EMA``: a copy of ``student`` sharded like it (the loop's ``Task.make_ema``)."""

    def make() -> nn.Module:
        with torch.device("meta"):
            ema = WanModel(cfg)
        if distributed:
            shard(ema, mixed)
        ema.to_empty(device=device)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), student.parameters(), strict=True):
                e.copy_(p)
        return ema

    return make


def join_process_group() -> tuple[bool, int, int, torch.device]:
    """``(distributed, rank, world, device)``: under ``torchrun`` (a world of 1 included: the same FSDP2 code path)
    join the process group, NCCL with CUDA and gloo without; the device is this rank's GPU, or the CPU."""
    cuda = torch.cuda.is_available()
    distributed = "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return distributed, rank, world, device


@dataclass
class FullRun:
    """A built full-scale run: the loop's task and settings, the resume fingerprint, and where this rank sits."""

    task: VideoDistillTask
    loop: LoopConfig
    fingerprint: dict
    distributed: bool
    rank: int


def start(args: argparse.Namespace) -> FullRun:
    """Join the process group (under ``torchrun``), build and shard the three models, and the task.

    Raises ``ValueError`` / ``FileNotFoundError`` with a one-line message on bad input.
    """
    distributed, rank, world, device = join_process_group()
    if args.total_batch % (world * args.batch_per_gpu):
        raise ValueError(
            f"--total-batch {args.total_batch} is not a multiple of {world} ranks x {args.batch_per_gpu} per GPU"
        )
    accum = args.total_batch // (world * args.batch_per_gpu)
    iters = RECIPE_ITERS[args.method] if args.iters is None else args.iters
    if args.method == "salt" and args.align_start >= iters:
        raise ValueError(
            f"--align-start {args.align_start} >= --iters {iters}: Salt's alignment would never run; train longer "
            "or start it earlier (both count generator iterations)"
        )
    task_cfg = VideoTaskConfig(
        method=args.method,
        latent=parse_latent(args.latent),
        causal=args.causal,
        memory=args.memory,
        batch=args.batch_per_gpu,
        recipe=recipe_from_args(args),
    )
    s_cfg, c_cfg, t_cfg = model_configs(args)
    ckpt_flag, mixed = args.activation_checkpointing, args.mixed_precision
    student = build_model(s_cfg, args.student, device, distributed, mixed, ckpt_flag)
    critic = build_model(c_cfg, args.critic, device, distributed, mixed, ckpt_flag)
    # the teacher checkpoints too: Salt's alignment backpropagates through its first blocks into x0
    teacher = build_model(t_cfg, args.teacher, device, distributed, mixed, ckpt_flag, frozen=True)
    prompts = EmbeddingPrompts(args.prompts, device=device)
    if prompts.width != s_cfg.text_dim:
        raise ValueError(f"prompt states have width {prompts.width}, the model expects {s_cfg.text_dim}")
    task = VideoDistillTask(
        task_cfg,
        student,
        critic,
        teacher,
        prompts,
        device=device,
        autocast=torch.bfloat16 if mixed else None,
        make_ema=ema_factory(s_cfg, student, device, distributed, mixed),
    )
    loop_cfg = LoopConfig(
        iters=iters,
        critic_ratio=args.critic_ratio,
        lr_gen=args.lr_gen,
        lr_critic=args.lr_critic,
        ema_start=args.ema_start,
        accum_steps=accum,
        ckpt_every=args.ckpt_every,
        log_every=1,
        seed=args.seed,
    )
    fingerprint = {
        "task": task_cfg.to_dict(),
        "student": s_cfg.to_dict(),
        "teacher": t_cfg.to_dict(),
        "mixed_precision": args.mixed_precision,
    }
    return FullRun(task, loop_cfg, fingerprint, distributed, rank)


def main(args: argparse.Namespace) -> int:
    if args.dry_run:
        world = args.gpus or int(os.environ.get("WORLD_SIZE", 1))
        print(plan(args, world))
        return 0
    # CUDA decides the device and the collective backend only; every feature switch (checkpointing, autocast,
    # the FSDP2 precision policy) is a flag with the same default on every device, so the CPU test runs this path
    cuda = torch.cuda.is_available()
    if not cuda and args.model != "tiny":
        print(
            f"error: --scale full with the {args.model} model needs CUDA GPUs (launch with torchrun on a GPU "
            "node); on this machine use --dry-run for the plan, or --model tiny --teacher-model tiny to run "
            "this code path on the CPU",
            file=sys.stderr,
        )
        return 2
    missing = [n for n in ("student", "critic", "teacher", "prompts") if getattr(args, n) is None]
    if missing:
        print(f"error: --scale full needs {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    try:
        run = start(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    task, loop_cfg, fingerprint, distributed, rank = run.task, run.loop, run.fingerprint, run.distributed, run.rank
    out = Path(args.out)
    try:
        result = train(
            task,
            loop_cfg,
            out,
            fingerprint=fingerprint,
            resume=args.resume,
            progress=not args.no_progress,
            checkpointer=DCPCheckpointer(out / "checkpoint"),
        )
    except NonFiniteLossError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except (CheckpointMismatchError, FileNotFoundError) as e:  # resume refusals and a held run lock, not bugs
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "iterations": result.iterations,
                    "last": {k: round(v, 6) for k, v in result.last_logs.items() if math.isfinite(v)},
                }
            )
        )
    return 0

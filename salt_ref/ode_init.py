r"""``python -m salt_ref.ode_init {pairs,train}``: the full-scale student initialisation (CausVid / Self-Forcing
"ODE init"): teacher trajectories to files, then a causal Wan regressed onto their endpoints.

Usage::

    python -m salt_ref.ode_init pairs --teacher T.safetensors --prompts P.safetensors --out PAIRS_DIR \
        [--model 1.3B|14B|tiny] [--latent 16x21x60x104] [--n N] [--grid-steps 48] [--record-steps 4] \
        [--cfg-scale 3.0] [--batch 1] [--seed 0] [--dtype bf16|fp32] [--device cuda:0] [--no-mixed-precision]
    torchrun --nproc_per_node 8 -m salt_ref.ode_init train --student Wan2.1-T2V-1.3B/ --pairs PAIRS_DIR \
        --out RUN_DIR [--model 1.3B|tiny] [--chunk-frames 3] [--iters N] [--batch-per-gpu 1] [--total-batch B] \
        [--lr 2e-6] [--ckpt-every 50] [--resume] [--seed 0] [--no-activation-checkpointing] [--no-mixed-precision]
    python -m salt_ref.convert export RUN_DIR --out ode_init.safetensors     # the --student of salt_ref.full

**pairs.** For prompt rows ``i = 0 .. N-1`` of the file ``python -m salt_ref.encode_prompts`` writes
(``context [N, L, D]``, ``negative [L, D]``), the bidirectional teacher integrates the probability-flow ODE from
seeded noise with DDIM and classifier-free guidance (the Self-Forcing form, :func:`salt_ref.dmd.cfg`) on the
recipe's warped grid ``g = recipe.sigmas(grid_steps)`` (:data:`salt_ref.recipe.PRESETS` ``["wan"]``, shift 5)::

    x_{g_0 = 1} = eps_i ~ N(0, I) [C, F, H, W]          eps_i from a CPU generator seeded seed * 2^32 + i
    v_hat = v_T(x, 1000 g_j, c_i) + s (v_T(x, 1000 g_j, c_i) - v_T(x, 1000 g_j, neg))      s = --cfg-scale
    x_{g_{j+1}} = x_{g_j} - (g_j - g_{j+1}) v_hat                                     (DDIM, j < grid_steps)

and keeps the states at the levels ``sigma = recipe.sigmas(record_steps)``, ``[K = record_steps + 1]``:
``sigma_k = warp(1 - k / record_steps, shift)`` for ``k < record_steps``, then 0. With 4 record steps these
are the student's 4-step list ``[1000, 750, 500, 250]`` warped, ``[1, 0.9375, 0.8333, 0.625]``, plus the clean
endpoint ``x0_T`` (the state at 0). Every ``sigma_k`` must lie on ``g`` (checked first, one ``error:`` line): the
warp is monotone, so that holds exactly when ``record_steps`` divides ``grid_steps`` (48 and 4: indices
``0, 12, 24, 36, 48``, as Self-Forcing's ``scripts/generate_ode_pairs.py``; its levels are warped with shift 8,
these with the recipe's shift, so they are the levels this student is sampled at). Row ``i`` becomes one file
``PAIRS_DIR/pair_{i:06d}.safetensors``::

    states [K, C, F, H, W]   (--dtype, bf16 by default)      the trajectory at sigma_0 = 1, ..., sigma_{K-1} = 0
    levels [K]               float32                         sigma
    context [L, D]           (--dtype)                       c_i, zero-padded to the length of the negative

written to a temporary name and ``os.replace``-d (:func:`salt_ref.checkpoint.save_atomic`), with a JSON header
(the row and the settings that decide its tensors). A rerun skips the rows already there and, since row ``i``'s
noise depends only on ``(seed, i)``, makes the same pairs for the others; it refuses a folder whose files were
made with other settings. Under ``torchrun`` rank ``r`` of ``W`` makes the rows ``i % W == r`` with its own
replica of the teacher (no process group, no FSDP: generation needs no communication). ``--batch`` rows share a
teacher call; it changes only the float rounding (the last bf16 bit), not which pairs are made. Memory, estimated
from the shapes (not measured): the 14B teacher is 26.6 GiB of weights in bf16 (53.2 GiB in fp32 with
``--no-mixed-precision``), plus the transients of a whole clip through one block with CFG (the batch doubled:
at 480x832 the float64 RoPE copies of q and k alone are ~2.7 GB each per row, and their temporaries several
more), so the 14B teacher needs an 80 GB GPU; the 1.3B teacher (2.6 GiB in bf16) fits any recent one.

**train.** The causal student ``WanConfig.preset(model, causal=True, chunk_frames=...)``, initialised from
``--student`` (Wan 1.3B: the same parameter names, block-causal attention), is trained by
:class:`~salt_ref.pretrain.ODERegressionTask` through :func:`salt_ref.loop.train` (checkpoints, ``--resume``,
``metrics.jsonl``, the run lock). Per micro-batch of ``B`` rows, each chunk ``c`` of ``chunk_frames`` latent
frames draws its own level ``k_c ~ U{0 .. K-1}`` (``k_c = K-1``, level 0, is what the KV cache holds at
inference)::

    x[:, :, f] = states[k_c(f)][:, :, f],   sigma_f = sigma_{k_c(f)}                      x [B, C, F, H, W]
    L_ODE = mean_{B, C, F, H, W} (x - sigma_f v_student(x, 1000 sigma_f, c | block-causal) - x0_T)^2

Frames drawn at level 0 contribute an error of exactly 0 (``x = x0_T``); Self-Forcing's ``model/ode_regression.py``
masks them out instead, which differs only by a scale of the loss (that AdamW's update nearly ignores). Each
update averages ``--total-batch`` rows: ``total / (ranks x batch_per_gpu)`` accumulated micro-batches per rank
(Self-Forcing's ``trainer/ode.py`` asserts a total batch of 64).

Under ``torchrun`` every network is built as :mod:`salt_ref.full` builds them (its ``build_model``: FSDP2
``fully_shard`` per block then the root, bf16 parameter gather and fp32 gradient reduce, fp32 master weights,
activation checkpointing) and the state goes to a sharded ``DCPCheckpointer(RUN_DIR / "checkpoint")``; a single
process without ``torchrun`` writes ``RUN_DIR/checkpoint.safetensors``. bf16 autocast and activation checkpointing
are flags with the same default (on) on every device, the CPU included. The rows are read lazily
(:class:`PairsDir`: only the drawn rows, per rank), so the pairs never have to fit in memory. The optimiser is
the loop's AdamW (betas ``(0, 0.999)``, weight decay 0.01, clip 10); the EMA is never started (``ema`` equals
``generator``: the init is the trained weights themselves). At the end rank 0 prints one JSON line
``{"out", "iterations", "last"}``.

Bad input (a missing file, a bad ``--latent``, record levels off the grid, an empty pairs folder, a pair file
whose shapes differ from the first one's, a checkpoint from another config on ``--resume``) is one ``error:``
line and exit code 2; a NaN/inf during training is exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from salt_ref.checkpoint import CheckpointMismatchError, read_header, save_atomic
from salt_ref.cli import Parser, positive_int
from salt_ref.full import build_model, ema_factory, join_process_group
from salt_ref.loop import DCPCheckpointer, LoopConfig, NonFiniteLossError, Rng, train
from salt_ref.memory_plan import parse_latent
from salt_ref.models.wan import CheckpointKeyError, WanConfig
from salt_ref.pretrain import ODEPairs, ODERegressionTask, teacher_trajectories
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.video_task import EmbeddingPrompts

__all__ = ["PAIR_GLOB", "pair_path", "row_noise", "check_on_grid", "PairsDir", "ODEInitTask", "build_parser", "main"]

PAIR_GLOB = "pair_*.safetensors"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_NEVER = 10**9  # ema_start past any run: the EMA mirrors the generator (Self-Forcing's ode_init.pt holds no EMA)


def pair_path(out: str | Path, i: int) -> Path:
    """``out / pair_{i:06d}.safetensors``: the file of prompt row ``i``."""
    return Path(out) / f"pair_{i:06d}.safetensors"


def row_noise(shape: tuple[int, ...], seed: int, i: int) -> Tensor:
    """The starting noise of row ``i``: ``randn(shape)`` from a CPU generator seeded ``seed * 2**32 + i``.

    A row's own seed (not one stream shared by the rows) makes a resumed or re-sharded run draw the same noise
    for every row, whichever rows were done before and whichever rank makes it; on the CPU, so every device too.
    """
    if not 0 <= i < 2**32:
        raise ValueError(f"row index {i} is outside [0, 2^32)")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + i))


def check_on_grid(grid: Tensor, record: Tensor, grid_steps: int, record_steps: int) -> None:
    """Raise a one-line ``ValueError`` unless every level of ``record`` is a point of ``grid`` (within 1e-6)."""
    off = [r for r in record.tolist() if float((grid - r).abs().min()) > 1e-6]
    if off:
        raise ValueError(
            f"the --record-steps {record_steps} levels {[round(r, 4) for r in off]} are not on the --grid-steps "
            f"{grid_steps} grid: use a --grid-steps that is a multiple of --record-steps"
        )


def _latent(spec: str) -> tuple[int, int, int, int]:
    shape = parse_latent(spec)  # one parser of C x F x H x W for both full-scale commands
    if min(shape) < 1:
        raise ValueError(f"--latent sizes must be positive, got {spec!r}")
    return shape


# ------------------------------------------------------------------------------------------- the pairs on disk


class _Rows:
    """One lazily read tensor of :class:`PairsDir`: ``shape`` and ``[idx]`` as a ``[N, ...]`` tensor would have."""

    def __init__(self, owner: PairsDir, key: str, shape: tuple[int, ...], last: bool = False):
        self.owner, self.key, self.shape, self.last = owner, key, torch.Size(shape), last

    def _read(self, i: int) -> Tensor:
        with safe_open(str(self.owner.files[i]), framework="pt") as f:
            if not self.last:
                return f.get_tensor(self.key)
            sl = f.get_slice(self.key)
            k = sl.get_shape()[0]
            return sl[k - 1 : k][0]  # only the endpoint's bytes are read

    def __getitem__(self, idx: Tensor | int) -> Tensor:
        o = self.owner
        if isinstance(idx, int) or (isinstance(idx, Tensor) and idx.ndim == 0):
            return self._read(int(idx)).to(o.device, o.dtype)
        return torch.stack([self._read(int(i)) for i in idx]).to(o.device, o.dtype)

    def __len__(self) -> int:
        return self.shape[0]


class PairsDir:
    """The pairs of a folder written by ``pairs``, read on demand: an :class:`~salt_ref.pretrain.ODEPairs` to
    :class:`~salt_ref.pretrain.ODERegressionTask` (same ``states``, ``levels``, ``context``, ``endpoint``).

    ``states[idx]`` ``[B, K, C, F, H, W]``, ``context[idx]`` ``[B, L, D]`` and ``endpoint[idx]`` ``[B, C, F, H, W]``
    read only the rows ``idx`` (memory-mapped safetensors; the endpoint only its last state) and return them on
    ``device`` in ``dtype``: float32 by default, whatever the files store, so the levels and the regression
    target keep full precision (autocast decides the model's compute dtype). ``levels [K]`` is in memory. Row
    ``j`` is the ``j``-th file in name order, so a folder with rows missing still works.

    Construction reads every file's header (not its tensors) and raises a one-line ``ValueError`` for an empty
    folder, a file without the three tensors, or one whose shapes or levels differ from the first file's.
    """

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path, self.device, self.dtype = Path(path), torch.device(device), dtype
        if not self.path.is_dir():
            raise FileNotFoundError(f"no pairs folder at {self.path}")
        self.files = sorted(self.path.glob(PAIR_GLOB))
        if not self.files:
            raise ValueError(f"{self.path} holds no pair files ({PAIR_GLOB}): run `python -m salt_ref.ode_init pairs`")
        first: dict[str, tuple[int, ...]] = {}
        levels = torch.zeros(0)
        for f in self.files:
            shapes, these = self._header(f)
            if not first:
                first, levels = shapes, these
            elif shapes != first:
                diff = ", ".join(f"{k} {shapes[k]} vs {first[k]}" for k in shapes if shapes[k] != first[k])
                raise ValueError(f"pair file {f.name} has other shapes than {self.files[0].name}: {diff}")
            elif not torch.equal(these, levels):
                raise ValueError(f"pair file {f.name} has other levels than {self.files[0].name}")
        if len(first["states"]) != 5 or len(first["context"]) != 2 or first["levels"] != first["states"][:1]:
            raise ValueError(f"pair files must hold states [K, C, F, H, W], levels [K], context [L, D]; got {first}")
        n = len(self.files)
        self.levels: Tensor = levels
        self.states = _Rows(self, "states", (n, *first["states"]))
        self.context = _Rows(self, "context", (n, *first["context"]))
        self.endpoint = _Rows(self, "states", (n, *first["states"][1:]), last=True)

    @staticmethod
    def _header(f: Path) -> tuple[dict[str, tuple[int, ...]], Tensor]:
        """The shapes of a pair file's tensors and its levels (the only tensor read here, ``[K]``)."""
        from safetensors import SafetensorError

        try:
            with safe_open(str(f), framework="pt") as sf:
                missing = {"states", "levels", "context"} - set(sf.keys())
                if missing:
                    raise ValueError(f"pair file {f} lacks tensors {sorted(missing)}")
                shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in ("states", "levels", "context")}
                return shapes, sf.get_tensor("levels").float()
        except SafetensorError as e:
            raise ValueError(f"pair file {f} is not a readable safetensors file ({e})") from None

    def __len__(self) -> int:
        return len(self.files)

    def to_pairs(self) -> ODEPairs:
        """Every row in memory (small runs and tests)."""
        idx = torch.arange(len(self))
        return ODEPairs(self.states[idx], self.levels.clone(), self.context[idx])


# ----------------------------------------------------------------------------------------------------- pairs


def _amp(device: torch.device, mixed: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``mixed`` (on every device, the CPU included), nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()


def _settings_differ(out: Path, settings: dict[str, Any]) -> str | None:
    """The first file of ``out`` made with other settings, described; ``None`` when all agree."""
    from safetensors import SafetensorError

    for f in sorted(out.glob(PAIR_GLOB)):
        try:
            theirs = read_header(f).get("settings", {})
        except SafetensorError as e:
            raise ValueError(f"pair file {f} is not a readable safetensors file ({e})") from None
        if theirs != settings:
            diff = [f"{k}: file {theirs.get(k)!r}, now {v!r}" for k, v in settings.items() if theirs.get(k) != v]
            return f"{f.name} ({'; '.join(diff) or 'other keys'})"
    return None


def _batches(rows: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(rows), size):
        yield rows[s : s + size]


def _pairs(args: argparse.Namespace) -> int:
    latent = _latent(args.latent)
    recipe = PRESETS["wan"].replace(cfg_scale=args.cfg_scale)
    grid, record = recipe.sigmas(args.grid_steps), recipe.sigmas(args.record_steps)
    check_on_grid(grid, record, args.grid_steps, args.record_steps)  # before minutes of loading a teacher
    for flag, path in (("--teacher", args.teacher), ("--prompts", args.prompts)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag}: no file at {path}")
    cfg = WanConfig.preset(args.model)  # the teacher scores whole clips: bidirectional
    c, _, h, w = latent
    if c != cfg.in_dim or h % cfg.patch_size[1] or w % cfg.patch_size[2]:
        raise ValueError(
            f"--latent {args.latent} does not fit the {args.model} model ({cfg.in_dim} channels, H, W even)"
        )
    prompts = EmbeddingPrompts(args.prompts)
    if prompts.width != cfg.text_dim or prompts.length > cfg.text_len:
        raise ValueError(
            f"prompt states are [{prompts.length}, {prompts.width}]; the {args.model} model takes "
            f"[<= {cfg.text_len}, {cfg.text_dim}]"
        )
    n = len(prompts) if args.n is None else args.n
    if n > len(prompts):
        raise ValueError(f"--n {n} but {args.prompts} holds {len(prompts)} prompts")
    # torchrun sets these; each rank works alone (no process group), on its own GPU with its own teacher replica
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"))
    if device.type == "cpu" and args.device is None and args.model != "tiny":
        raise ValueError(f"the {args.model} teacher needs a CUDA GPU (or --device cpu to run it on the CPU anyway)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps({
        "model": args.model, "latent": latent, "grid_steps": args.grid_steps, "record_steps": args.record_steps,
        "shift": recipe.shift, "cfg_scale": recipe.cfg_scale, "seed": args.seed, "dtype": args.dtype,
        "mixed_precision": args.mixed_precision,
    }))  # fmt: skip
    other = _settings_differ(out, settings)
    if other is not None:
        raise ValueError(f"{out} holds pairs made with other settings, {other}: use a new --out or the same flags")
    rows = [i for i in range(n) if i % world == rank]
    todo = [i for i in rows if not pair_path(out, i).exists()]
    if todo:  # a finished folder is checked without loading the teacher
        teacher = build_model(cfg, args.teacher, device, False, args.mixed_precision, False, frozen=True).eval()
        dtype = _DTYPES[args.dtype]
        source = {"teacher": str(args.teacher), "prompts": str(args.prompts)}
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="pairs", disable=args.no_progress or rank != 0)
        for batch in _batches(todo, args.batch):
            noise = torch.stack([row_noise(latent, args.seed, i) for i in batch]).to(device)
            ctx = prompts.rows(torch.tensor(batch)).to(device)
            neg = prompts.negative[None].expand(len(batch), -1, -1).to(device)
            with _amp(device, args.mixed_precision):
                traj = teacher_trajectories(teacher, noise, ctx, neg, grid, record, cfg_scale=recipe.cfg_scale)
            for b, i in enumerate(batch):
                tensors = {
                    "states": traj.states[b].to(dtype).cpu(),
                    "levels": traj.levels.float().cpu(),
                    "context": ctx[b].to(dtype).cpu(),
                }
                save_atomic(pair_path(out, i), tensors, {"row": i, "settings": settings, "source": source})
            bar.update(len(batch))
        bar.close()
    print(json.dumps({"out": str(out), "rank": rank, "world": world, "rows": len(rows), "written": len(todo)}))
    return 0


# ----------------------------------------------------------------------------------------------------- train


class ODEInitTask:
    """:class:`~salt_ref.pretrain.ODERegressionTask` with the full-scale trimmings the loop reads: every forward
    under bf16 autocast (or none), and ``make_ema`` to build the EMA sharded like the student."""

    critic = None

    def __init__(
        self,
        inner: ODERegressionTask,
        *,
        device: torch.device,
        mixed: bool,
        make_ema: Callable[[], nn.Module] | None = None,
    ):
        self.inner, self.generator, self.device, self.mixed = inner, inner.generator, device, mixed
        if make_ema is not None:
            self.make_ema = make_ema

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        with _amp(self.device, self.mixed):
            return self.inner.generator_loss(it, rng, ema)

    def critic_loss(self, it: int, rng: Rng):  # pragma: no cover - no critic
        raise AssertionError("ODE regression has no critic")


def _start(args: argparse.Namespace, distributed: bool, world: int, device: torch.device):
    """The task, loop settings and fingerprint of a ``train`` run (the student built and sharded)."""
    if not Path(args.student).exists():
        raise FileNotFoundError(f"--student: no checkpoint at {args.student}")
    pairs = PairsDir(args.pairs, device=device)
    cfg = WanConfig.preset(args.model, causal=True, chunk_frames=args.chunk_frames)
    _, c, frames, _, _ = pairs.states.shape[1:]
    length, width = pairs.context.shape[1:]
    if c != cfg.in_dim or width != cfg.text_dim or length > cfg.text_len:
        raise ValueError(
            f"pairs of {c} channels and text [{length}, {width}] do not fit the {args.model} student "
            f"({cfg.in_dim} channels, text [<= {cfg.text_len}, {cfg.text_dim}])"
        )
    per_step = world * args.batch_per_gpu
    total = args.total_batch or per_step
    if total % per_step:
        raise ValueError(f"--total-batch {total} is not a multiple of {world} ranks x {args.batch_per_gpu} per GPU")
    mixed = args.mixed_precision
    student = build_model(cfg, args.student, device, distributed, mixed, args.activation_checkpointing)
    inner = ODERegressionTask(student, pairs, batch=args.batch_per_gpu, chunk_frames=args.chunk_frames)
    task = ODEInitTask(
        inner, device=device, mixed=mixed, make_ema=ema_factory(cfg, student, device, distributed, mixed)
    )
    loop = LoopConfig(
        iters=args.iters,
        critic_ratio=0,
        lr_gen=args.lr,
        ema_start=_NEVER,
        accum_steps=total // per_step,
        ckpt_every=args.ckpt_every,
        log_every=1,
        seed=args.seed,
    )
    fingerprint = {
        "ode_init": {
            "rows": len(pairs),
            "states": list(pairs.states.shape[1:]),
            "levels": pairs.levels.tolist(),
            "chunk_frames": args.chunk_frames,
            "batch_per_gpu": args.batch_per_gpu,
        },
        "student": cfg.to_dict(),  # the key salt_ref.convert export reads the student's shape from
        "mixed_precision": mixed,
    }
    return task, loop, fingerprint


def _train(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and args.model != "tiny":
        return _fail(
            f"train with the {args.model} student needs CUDA GPUs (torchrun on a GPU node); "
            "--model tiny runs on the CPU"
        )
    distributed, rank, world, device = join_process_group()
    try:
        try:
            task, loop, fingerprint = _start(args, distributed, world, device)
        except (ValueError, FileNotFoundError, CheckpointKeyError) as e:
            return _fail(str(e))
        out = Path(args.out)
        try:
            result = train(
                task,
                loop,
                out,
                fingerprint=fingerprint,
                resume=args.resume,
                progress=not args.no_progress,
                checkpointer=DCPCheckpointer(out / "checkpoint") if distributed else None,
            )
        except NonFiniteLossError as e:
            print(f"error: training diverged: {e}", file=sys.stderr)
            return 1
        except (CheckpointMismatchError, FileNotFoundError, ValueError) as e:  # resume refusals, a held run lock
            return _fail(str(e))
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        last = {k: round(v, 6) for k, v in result.last_logs.items() if math.isfinite(v)}
        print(json.dumps({"out": str(out), "iterations": result.iterations, "last": last}))
    return 0


# ------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``pairs`` and ``train`` subcommands (errors: one ``error:`` line, exit code 2)."""
    p = Parser(
        prog="python -m salt_ref.ode_init",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    wan: Recipe = PRESETS["wan"]
    mixed_help = "bf16 autocast (and a bf16 teacher / FSDP2 bf16 gather); every device, the CPU included"

    g = sub.add_parser("pairs", help="teacher ODE trajectories, one file per prompt row")
    g.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors, index or folder)")
    g.add_argument("--prompts", required=True, help="text states from salt_ref.encode_prompts (context, negative)")
    g.add_argument("--out", required=True, help="PAIRS_DIR: receives pair_{i:06d}.safetensors")
    g.add_argument("--model", choices=["1.3B", "14B", "tiny"], default="1.3B", help="teacher size")
    g.add_argument("--latent", default="16x21x60x104", help="latent C x F x H x W (480x832, 81 frames)")
    g.add_argument("--n", type=positive_int, default=None, help="prompt rows 0..N-1 (default: all)")
    g.add_argument("--grid-steps", type=positive_int, default=48, help="the teacher's DDIM grid")
    g.add_argument("--record-steps", type=positive_int, default=4, help="states kept at this list's levels + 0")
    g.add_argument("--cfg-scale", type=float, default=wan.cfg_scale, help="cond + s (cond - negative)")
    g.add_argument("--batch", type=positive_int, default=1, help="rows per teacher call")
    g.add_argument("--seed", type=int, default=0, help="row i's noise is seeded seed * 2^32 + i")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="storage of states and context")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with CUDA, else cpu")
    g.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=True, help=mixed_help)
    g.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="regress the causal student onto the pairs' endpoints")
    t.add_argument("--student", required=True, help="init checkpoint (Wan2.1-T2V-1.3B; .safetensors, index, dir)")
    t.add_argument("--pairs", required=True, help="PAIRS_DIR written by `pairs`")
    t.add_argument("--out", required=True, help="RUN_DIR: checkpoint, metrics.jsonl")
    t.add_argument("--model", choices=["1.3B", "tiny"], default="1.3B", help="student size")
    t.add_argument("--chunk-frames", type=positive_int, default=WanConfig().chunk_frames, help="frames per chunk")
    t.add_argument("--iters", type=int, default=LoopConfig().iters)
    t.add_argument("--batch-per-gpu", type=positive_int, default=1)
    t.add_argument("--total-batch", type=positive_int, default=None, help="default: ranks x batch-per-gpu")
    t.add_argument("--lr", type=float, default=2e-6)
    t.add_argument("--ckpt-every", type=positive_int, default=50)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute block activations in the backward (every device, the CPU included)",
    )
    t.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=True, help=mixed_help)
    return p


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0; 2 after one ``error:`` line; 1 if training diverged)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, a bad flag: the code comes back, not an exception
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command == "train":
        return _train(args)
    try:
        return _pairs(args)
    except (ValueError, FileNotFoundError, CheckpointKeyError) as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())

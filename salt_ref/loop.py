r"""The one training loop: generator/critic alternation with EMA, clipping, logging, checkpoints and resume.

Per iteration ``i`` (counted in generator updates), with ``A`` gradient-accumulation micro-batches per rank::

    theta_G <- AdamW(theta_G, clip(mean_{ranks, A} grad L_G))          L_G from the task (DMD, SC-DMD, CD, Salt)
    EMA     <- theta_G                                 if i < ema_start
               decay * EMA + (1 - decay) * theta_G     otherwise
    repeat critic_ratio times:  theta_F <- AdamW(theta_F, clip(mean grad L_F))    (skipped without a critic)

Randomness comes from two kinds of ``torch.Generator`` (both saved in every checkpoint):

- ``shared``: the same on every rank and micro-batch of an iteration; the *choices* (step list, exit step, SC
  points) are drawn from it, as the public code broadcasts them from rank 0;
- ``local[j]``: one stream per global micro-batch ``rank * A + j``; noise, prompts and levels come from it.

So ``world x A`` fixes the data: 2 processes with ``A = 1`` see exactly the micro-batches that 1 process with
``A = 2`` sees, and their losses agree up to float reduction order. A killed run resumed from its last
checkpoint reaches bitwise the same final weights as an uninterrupted run (single process, CPU). A non-finite
loss or gradient norm stops the run with :class:`NonFiniteLossError`; the last good checkpoint is kept.

Checkpoints are written by a :class:`~salt_ref.checkpoint.Checkpointer` from :mod:`salt_ref.checkpoint` (a
single safetensors file, or a sharded ``torch.distributed.checkpoint`` folder under FSDP2), re-exported here.
Each stores the run's fingerprint, built by the loop with one rule at every scale: the setup's part (its config,
recipe, model shapes) plus ``"loop"`` (:func:`loop_fingerprint`: the settings but ``RESUME_FREE``) and
``"world_x_accum"``; a resume with another fingerprint is refused, naming each differing field.

While it runs, :func:`train` holds ``out_dir/.lock`` (:mod:`salt_ref.run_lock`): one output folder, one live run.
A fresh run (``resume=False``) first deletes the folder's checkpoint and ``metrics.jsonl`` (the command lines
refuse such a folder unless told ``--overwrite``), so a folder never holds two runs' files. ``metrics.jsonl`` has
one JSON object per logged iteration; :data:`METRICS_SCHEMA`, written beside it as ``metrics.schema.json``, says
what each key means and which way is better. A line torn by a kill is dropped on resume.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from salt_ref.checkpoint import (
    CHECKPOINT_NAME,
    Checkpointer,
    CheckpointMismatchError,
    DCPCheckpointer,
    SafetensorsCheckpointer,
    rank_and_world,
)
from salt_ref.run_lock import RunLock

__all__ = [
    "LoopConfig",
    "Rng",
    "Task",
    "NonFiniteLossError",
    "LoopResult",
    "Checkpointer",
    "SafetensorsCheckpointer",
    "DCPCheckpointer",
    "train",
    "loop_fingerprint",
    "RESUME_FREE",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "METRICS_SCHEMA",
    "SCHEMA_NAME",
    "read_metrics",
]

METRICS_NAME = "metrics.jsonl"
SCHEMA_NAME = "metrics.schema.json"

# What each key of a metrics.jsonl row means: "better" is the direction of improvement where there is one (a
# distillation loss is a training signal, not a quality score: its level moves with the critic, so it has none).
METRICS_SCHEMA: dict[str, dict[str, str]] = {
    "iter": {"type": "integer", "meaning": "generator iterations done when the row was logged"},
    "time_s": {"type": "number", "unit": "s", "meaning": "wall time since this process started training"},
    "loss_gen": {"type": "number", "meaning": "the generator's total loss (the sum of its terms below)"},
    "loss_dmd": {"type": "number", "meaning": "DMD term (its value is a surrogate; its gradient is DMD's)"},
    "loss_sc": {
        "type": "number",
        "better": "lower",
        "meaning": "self-consistency term (0: the coarse step lands where the fine steps do)",
    },
    "loss_align": {"type": "number", "better": "lower", "meaning": "Salt's feature alignment (MMD) term"},
    "loss_cd": {"type": "number", "better": "lower", "meaning": "consistency-distillation loss"},
    "loss_fm": {"type": "number", "better": "lower", "meaning": "flow-matching loss (teacher pretraining)"},
    "loss_ode": {"type": "number", "better": "lower", "meaning": "ODE-regression loss (student init)"},
    "loss_critic": {
        "type": "number",
        "meaning": "the critic's flow-matching loss on student samples, mean over its updates of the iteration",
    },
    "grad_norm_gen": {"type": "number", "meaning": "generator gradient norm before clipping"},
    "n_steps": {"type": "integer", "meaning": "the step list drawn for this iteration's rollout"},
    "exit": {"type": "integer", "meaning": "the exit step of the rollout (its index in the step list)"},
}


@dataclass
class LoopConfig:
    """Optimisation settings shared by every scale (defaults: the Self-Forcing / Salt recipe)."""

    iters: int = 1000
    critic_ratio: int = 5
    lr_gen: float = 2e-6
    lr_critic: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    ema_start: int = 200
    accum_steps: int = 1
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.critic_ratio < 0:
            raise ValueError(f"critic_ratio must be >= 0, got {self.critic_ratio}")
        if self.ckpt_every < 1 or self.log_every < 1 or self.accum_steps < 1:
            raise ValueError("ckpt_every, log_every and accum_steps must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class Rng:
    """The generators one micro-batch draws from: ``shared`` choices and ``local`` data."""

    shared: torch.Generator
    local: torch.Generator


class Task(Protocol):
    """What a setup hands the loop: the trained networks and their losses for one micro-batch.

    A task may also define ``make_ema() -> nn.Module`` (default: a deep copy of ``generator``), e.g. to build
    the EMA sharded like the generator under FSDP2.
    """

    generator: nn.Module
    critic: nn.Module | None

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]: ...

    def critic_loss(self, it: int, rng: Rng) -> tuple[Tensor, dict[str, float]]: ...


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf; the message names the iteration and the last good checkpoint."""


@dataclass
class LoopResult:
    iterations: int
    ema: nn.Module
    last_logs: dict[str, float]
    checkpoint: Path


class _State:
    """Everything a checkpoint holds: networks, EMA, optimizers, generators and the iteration count.

    The ``state`` a :class:`~salt_ref.checkpoint.Checkpointer` saves and loads (by duck typing, see there).
    """

    def __init__(self, task: Task, cfg: LoopConfig):
        self.task, self.cfg = task, cfg
        make_ema = getattr(task, "make_ema", None)
        self.ema = (make_ema() if make_ema is not None else copy.deepcopy(task.generator)).requires_grad_(False)
        self.opt_gen = self._adamw(task.generator, cfg.lr_gen)
        self.opt_critic = self._adamw(task.critic, cfg.lr_critic) if task.critic is not None else None
        rank, _ = rank_and_world()
        self.shared = torch.Generator().manual_seed(cfg.seed)
        # stream seeds depend on the global micro-batch index only, so world x accum fixes the data
        self.local = [
            torch.Generator().manual_seed(cfg.seed * 100_003 + 7919 * (rank * cfg.accum_steps + j) + 1)
            for j in range(cfg.accum_steps)
        ]
        self.done = 0

    def _adamw(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.AdamW(module.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def rng_tensors(self) -> dict[str, Tensor]:
        return {
            "rng.shared": self.shared.get_state(),
            **{f"rng.local.{j}": g.get_state() for j, g in enumerate(self.local)},
        }

    def set_rng(self, tensors: dict[str, Tensor]) -> None:
        self.shared.set_state(tensors["rng.shared"])
        for j, g in enumerate(self.local):
            g.set_state(tensors[f"rng.local.{j}"])


def _as_float(x: Tensor) -> float:
    full = getattr(x, "full_tensor", None)  # FSDP2 returns DTensor norms
    return float((full() if full is not None else x).item())


def _device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: collectives go there (NCCL refuses CPU tensors)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _reduce_logs(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of every numeric log over ranks (all ranks log the same keys: their choices are shared).

    The reduction runs on ``device``, the model's: NCCL refuses CPU tensors (gloo takes both, so a CPU run
    alone would not notice a CPU tensor here). float64 where the device has it: the logs are small.
    """
    _, world = rank_and_world()
    if world == 1 or not logs:
        return logs
    keys = sorted(logs)
    vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vals)
    return _integers_back({k: v / world for k, v in zip(keys, vals.cpu().tolist(), strict=True)}, logs)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over ranks, so a NaN on one rank stops every rank at the same point (instead of the other
    ranks waiting in the next collective until the timeout)."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _optimise(
    losses: Callable[[Rng], tuple[Tensor, dict[str, float]]],
    state: _State,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    what: str,
    it: int,
    last_good: str,
) -> dict[str, float]:
    """One optimizer step on the mean over ``accum_steps`` micro-batches; returns the averaged logs."""
    cfg = state.cfg
    device = _device(module)
    opt.zero_grad(set_to_none=True)
    shared_start = state.shared.get_state()
    logs_sum: dict[str, float] = {}
    for local in state.local:
        state.shared.set_state(shared_start)  # every micro-batch of the iteration makes the same choices
        loss, logs = losses(Rng(state.shared, local))
        bad = not bool(torch.isfinite(loss.detach()))
        if _any_rank(bad, device):  # before backward: FSDP's gradient reduce would wait for the broken rank
            where = f"is {loss.item()}" if bad else "is not finite on another rank"
            raise NonFiniteLossError(f"{what} loss {where} at iteration {it}; {last_good}")
        (loss / cfg.accum_steps).backward()
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / cfg.accum_steps
    norm = _as_float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip))
    if not torch.isfinite(torch.tensor(norm)):
        raise NonFiniteLossError(f"{what} gradient norm is {norm} at iteration {it}; {last_good}")
    opt.step()
    logs_sum[f"grad_norm_{what}"] = norm
    return _integers_back(logs_sum, logs)


def _integers_back(means: dict[str, float], sample: dict[str, Any]) -> dict[str, float | int]:
    """Counts the task logged as ints (step list, exit step) stay ints: they are shared, so their mean is whole."""
    return {k: int(v) if isinstance(sample.get(k), int) and float(v).is_integer() else v for k, v in means.items()}


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float | None) -> None:
    """``ema <- decay * ema + (1 - decay) * model``; ``decay=None`` copies (before ``ema_start``)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        if decay is None:
            e.copy_(p.detach())
        else:
            e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (keys: :data:`METRICS_SCHEMA`); a line torn by a kill mid-write (not a
    JSON object with an integer ``iter``) is dropped."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            rows.append(row)
    return rows


def _trim_metrics(path: Path, upto: int) -> None:
    """Drop log lines past the resumed iteration (and a torn last one) so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["iter"] <= upto]
    path.write_text("".join(json.dumps(row) + "\n" for row in keep))


# Settings a resumed run may change: the budget, the bookkeeping, and the accumulation split (its product with the
# world size, which fixes the data streams, is checked separately as ``world_x_accum``).
RESUME_FREE = ("iters", "ckpt_every", "log_every", "accum_steps")


def loop_fingerprint(cfg: LoopConfig) -> dict[str, Any]:
    """The part of ``cfg`` a checkpoint must agree with on resume (everything but ``RESUME_FREE``).

    :func:`train` stores it under the fingerprint's ``"loop"`` key; setups do not add it themselves.
    """
    return {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}


_LOOP_KEYS = ("loop", "world_x_accum")  # the fingerprint keys train owns


def _run_fingerprint(setup: dict[str, Any] | None, cfg: LoopConfig, world: int) -> dict[str, Any]:
    """The setup's part plus the loop's own rule, as JSON will store it (tuples become lists)."""
    setup = {} if setup is None else setup
    clash = [k for k in _LOOP_KEYS if k in setup]
    if clash:
        raise ValueError(
            f"fingerprint must not contain {clash}: train adds 'loop' (loop_fingerprint(cfg)) and 'world_x_accum' "
            "itself; pass only the setup's part (config, recipe, model shapes)"
        )
    return json.loads(json.dumps({**setup, "loop": loop_fingerprint(cfg), "world_x_accum": world * cfg.accum_steps}))


def _param_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train(
    task: Task,
    cfg: LoopConfig,
    out_dir: str | Path,
    *,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    checkpointer: Checkpointer | None = None,
    desc: str = "train",
) -> LoopResult:
    """Run ``cfg.iters`` generator iterations of ``task`` writing into ``out_dir``.

    Args:
        task: the setup (networks and losses).
        cfg: optimisation and bookkeeping settings.
        out_dir: receives the checkpoint and (rank 0) ``metrics.jsonl``; holds ``.lock`` while the run is alive.
        fingerprint: JSON-able description of what the setup must keep equal on resume: its config, recipe,
            model shapes. The loop adds its own part to it, ``"loop"`` (:func:`loop_fingerprint`) and
            ``"world_x_accum"``, so it must not contain those keys (``ValueError``); default: no setup part.
        resume: continue from ``out_dir``'s checkpoint (error if there is none, it has another fingerprint, it is
            damaged, or it is already past ``cfg.iters``). Without it, the folder's checkpoint and metrics are
            deleted first: a fresh run starts over.
        progress: show a progress bar (rank 0).
        callback: ``callback(iteration_done, logs)`` after each iteration (for tests and notebooks).
        checkpointer: where state goes (default: ``out_dir/checkpoint.safetensors``).
        desc: the progress bar's label: the stage this run is (``"teacher"``, ``"distill"``, ...).

    Raises:
        RunLockedError: another live run holds ``out_dir`` (:mod:`salt_ref.run_lock`).
        CheckpointMismatchError: ``resume`` onto a checkpoint with another fingerprint, naming the fields, or one
            already past ``cfg.iters``; :class:`~salt_ref.checkpoint.CheckpointDamagedError` (a subclass) for a
            damaged one.
        CheckpointWriteError: no space left for a checkpoint (the previous one is intact).
        FileNotFoundError: ``resume`` without a checkpoint.
        NonFiniteLossError: a NaN/inf loss or gradient norm; the last good checkpoint is kept.
    """
    rank, world = rank_and_world()
    fingerprint = _run_fingerprint(fingerprint, cfg, world)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # taken before anything is written; under torch.distributed rank 0 holds it and the others wait for it
    with RunLock(out_dir, device=_param_device(task.generator)):
        return _train_locked(task, cfg, out_dir, fingerprint, resume, progress, callback, checkpointer, desc)


def _train_locked(
    task: Task,
    cfg: LoopConfig,
    out_dir: Path,
    fingerprint: dict[str, Any],
    resume: bool,
    progress: bool,
    callback: Callable[[int, dict[str, float]], None] | None,
    checkpointer: Checkpointer | None,
    desc: str,
) -> LoopResult:
    rank, _ = rank_and_world()
    saver = checkpointer or SafetensorsCheckpointer(out_dir / CHECKPOINT_NAME)
    metrics_path = out_dir / METRICS_NAME
    state = _State(task, cfg)
    if resume:
        if not saver.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {saver.path}")
        saver.load(state, fingerprint)
        if state.done > cfg.iters:
            raise CheckpointMismatchError(
                f"--resume: the run in {out_dir} is already at iteration {state.done}, past --iters {cfg.iters}; "
                f"give --iters {state.done} or more to continue it"
            )
        if rank == 0:
            _trim_metrics(metrics_path, state.done)
    else:
        saver.discard()  # a fresh run never leaves an older run's checkpoint beside its own metrics
        if rank == 0:
            metrics_path.unlink(missing_ok=True)
    if rank == 0:
        (out_dir / SCHEMA_NAME).write_text(json.dumps(METRICS_SCHEMA, indent=1) + "\n")
    last_good = f"last good checkpoint: {saver.path} (iteration {state.done})" if resume else "no checkpoint yet"
    task.generator.train()
    if task.critic is not None:
        task.critic.train()
    logs: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=state.done, disable=not progress or rank != 0, desc=desc, dynamic_ncols=True)
    metrics_file = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115 - closed below
    try:
        for it in range(state.done, cfg.iters):
            logs = _optimise(
                lambda r, it=it: task.generator_loss(it, r, state.ema),
                state,
                task.generator,
                state.opt_gen,
                "gen",
                it,
                last_good,
            )
            _ema_update(state.ema, task.generator, None if it < cfg.ema_start else cfg.ema_decay)
            if task.critic is not None and cfg.critic_ratio > 0:
                critic_logs = [
                    _optimise(
                        lambda r, it=it: task.critic_loss(it, r),
                        state,
                        task.critic,
                        state.opt_critic,
                        "critic",
                        it,
                        last_good,
                    )
                    for _ in range(cfg.critic_ratio)
                ]
                logs["loss_critic"] = sum(c["loss_critic"] for c in critic_logs) / len(critic_logs)
            logs = _reduce_logs(logs, _device(task.generator))
            state.done = it + 1
            if metrics_file is not None and (state.done % cfg.log_every == 0 or state.done == cfg.iters):
                row = {"iter": state.done, **logs, "time_s": round(time.perf_counter() - t0, 3)}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if state.done % cfg.ckpt_every == 0 or state.done == cfg.iters:
                saver.save(state, fingerprint)
                last_good = f"last good checkpoint: {saver.path} (iteration {state.done})"
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
            if callback is not None:
                callback(state.done, logs)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if not saver.exists():  # iters == 0 on a fresh run: still leave a loadable checkpoint
        saver.save(state, fingerprint)
    return LoopResult(state.done, state.ema, logs, saver.path)

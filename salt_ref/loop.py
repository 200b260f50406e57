r"""The one training loop: generator/critic alternation with EMA, clipping, logging, checkpoints and resume.

Per iteration ``i`` (counted in generator updates)::

    theta_G <- AdamW(theta_G, clip(grad L_G))                  L_G from the task (DMD, SC-DMD, CD, Salt)
    EMA     <- theta_G                   if i < ema_start
               decay * EMA + (1 - decay) * theta_G   otherwise
    repeat critic_ratio times:  theta_F <- AdamW(theta_F, clip(grad L_F))     (skipped without a critic)

All randomness of an iteration comes from one ``torch.Generator`` owned by the loop and saved in every
checkpoint with the weights, EMA and both optimizers, so a killed run resumed from its last checkpoint reaches
bitwise the same final weights as an uninterrupted run (on CPU, same thread count). A non-finite loss or
gradient norm stops the run with :class:`NonFiniteLossError`; the last good checkpoint is left untouched.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from salt_ref import checkpoint as ckpt

__all__ = ["LoopConfig", "Task", "NonFiniteLossError", "LoopResult", "train", "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.jsonl"


@dataclass
class LoopConfig:
    """Optimisation settings shared by every scale (defaults: the Self-Forcing / Salt recipe ratios)."""

    iters: int = 1000
    critic_ratio: int = 5
    lr_gen: float = 2e-6
    lr_critic: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    ema_start: int = 200
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.critic_ratio < 0:
            raise ValueError(f"critic_ratio must be >= 0, got {self.critic_ratio}")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise ValueError("ckpt_every and log_every must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class Task(Protocol):
    """What a setup hands the loop: the trained networks and their losses for one update."""

    generator: nn.Module
    critic: nn.Module | None

    def generator_loss(self, it: int, rng: torch.Generator, ema: nn.Module) -> tuple[Tensor, dict[str, float]]: ...

    def critic_loss(self, it: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]: ...


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf; the message names the iteration and the last good checkpoint."""


@dataclass
class LoopResult:
    iterations: int
    ema: nn.Module
    last_logs: dict[str, float]
    checkpoint: Path


def _adamw(module: nn.Module, lr: float, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class _State:
    """Everything a checkpoint holds, with save/load in the flat safetensors layout."""

    def __init__(self, task: Task, cfg: LoopConfig):
        self.task, self.cfg = task, cfg
        self.ema = copy.deepcopy(task.generator).requires_grad_(False)
        self.opt_gen = _adamw(task.generator, cfg.lr_gen, cfg)
        self.opt_critic = _adamw(task.critic, cfg.lr_critic, cfg) if task.critic is not None else None
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.done = 0

    def save(self, path: Path, fingerprint: dict[str, Any]) -> None:
        tensors = {**ckpt.module_tensors("generator", self.task.generator), **ckpt.module_tensors("ema", self.ema)}
        opt_t, opt_h = ckpt.optimizer_tensors("opt_gen", self.opt_gen)
        tensors.update(opt_t)
        header: dict[str, Any] = {"iteration": self.done, "config": fingerprint, "opt_gen": opt_h}
        if self.opt_critic is not None:
            tensors.update(ckpt.module_tensors("critic", self.task.critic))
            opt_t, header["opt_critic"] = ckpt.optimizer_tensors("opt_critic", self.opt_critic)
            tensors.update(opt_t)
        tensors["rng"] = self.rng.get_state()
        ckpt.save_atomic(path, tensors, header)

    def load(self, path: Path, fingerprint: dict[str, Any]) -> None:
        header = ckpt.read_header(path)
        theirs = header.get("config", {})
        if theirs != fingerprint:
            diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
            raise ckpt.CheckpointMismatchError(
                f"{path} was written by another config (differs in {diff}); use a new --out or the same settings"
            )
        tensors, header = ckpt.load_state(path)
        ckpt.load_module_tensors("generator", self.task.generator, tensors)
        ckpt.load_module_tensors("ema", self.ema, tensors)
        ckpt.load_optimizer_tensors("opt_gen", self.opt_gen, tensors, header["opt_gen"])
        if self.opt_critic is not None:
            ckpt.load_module_tensors("critic", self.task.critic, tensors)
            ckpt.load_optimizer_tensors("opt_critic", self.opt_critic, tensors, header["opt_critic"])
        self.rng.set_state(tensors["rng"])
        self.done = int(header["iteration"])


def _finite_step(
    loss: Tensor, module: nn.Module, opt: torch.optim.Optimizer, clip: float, what: str, it: int, last_good: str
) -> float:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{what} loss is {loss.item()} at iteration {it}; {last_good}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    if not torch.isfinite(norm):
        raise NonFiniteLossError(f"{what} gradient norm is {float(norm)} at iteration {it}; {last_good}")
    opt.step()
    return float(norm)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _trim_metrics(path: Path, upto: int) -> None:
    """Drop log lines past the resumed iteration so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iter"] <= upto]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(
    task: Task,
    cfg: LoopConfig,
    out_dir: str | Path,
    *,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> LoopResult:
    """Run ``cfg.iters`` generator iterations of ``task`` writing into ``out_dir``.

    Args:
        task: the setup (networks and losses).
        cfg: optimisation and bookkeeping settings.
        out_dir: receives ``checkpoint.safetensors`` and ``metrics.jsonl``.
        fingerprint: JSON-able description of everything that must match on resume (defaults to ``cfg``
            without ``iters``).
        resume: continue from ``out_dir``'s checkpoint (error if there is none or it has another fingerprint).
        callback: ``callback(iteration_done, logs)`` after each iteration (for tests and notebooks).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    if fingerprint is None:
        fingerprint = {k: v for k, v in asdict(cfg).items() if k != "iters"}
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples become lists, as they come back from JSON
    state = _State(task, cfg)
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {out_dir}")
        state.load(ckpt_path, fingerprint)
        _trim_metrics(metrics_path, state.done)
    else:
        metrics_path.unlink(missing_ok=True)
    last_good = f"last good checkpoint: {ckpt_path} (iteration {state.done})" if resume else "no checkpoint yet"
    task.generator.train()
    if task.critic is not None:
        task.critic.train()
    logs: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=state.done, disable=not progress, desc="train", dynamic_ncols=True)
    with open(metrics_path, "a") as metrics_file:
        for it in range(state.done, cfg.iters):
            loss, logs = task.generator_loss(it, state.rng, state.ema)
            logs["grad_norm_gen"] = _finite_step(
                loss, task.generator, state.opt_gen, cfg.grad_clip, "generator", it, last_good
            )
            if it < cfg.ema_start:
                state.ema.load_state_dict(task.generator.state_dict())
            else:
                _ema_update(state.ema, task.generator, cfg.ema_decay)
            critic_losses = []
            for _ in range(cfg.critic_ratio if task.critic is not None else 0):
                c_loss, _ = task.critic_loss(it, state.rng)
                _finite_step(c_loss, task.critic, state.opt_critic, cfg.grad_clip, "critic", it, last_good)
                critic_losses.append(c_loss.item())
            if critic_losses:
                logs["loss_critic"] = sum(critic_losses) / len(critic_losses)
            state.done = it + 1
            if state.done % cfg.log_every == 0 or state.done == cfg.iters:
                row = {"iter": state.done, **logs, "time_s": round(time.perf_counter() - t0, 3)}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if state.done % cfg.ckpt_every == 0 or state.done == cfg.iters:
                state.save(ckpt_path, fingerprint)
                last_good = f"last good checkpoint: {ckpt_path} (iteration {state.done})"
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
            if callback is not None:
                callback(state.done, logs)
    bar.close()
    if not ckpt_path.exists():  # iters == 0 on a fresh run: still leave a loadable checkpoint
        state.save(ckpt_path, fingerprint)
    if any(isinstance(v, float) and math.isnan(v) for v in logs.values()):
        raise NonFiniteLossError(f"non-finite value in final logs {logs}")
    return LoopResult(state.done, state.ema, logs, ckpt_path)

r"""Before distillation: a teacher trained by flow matching, and a causal student initialised by ODE regression.

Both run through the shared loop as tasks without a critic.

Teacher (flow matching with classifier-free-guidance dropout)::

    x0 ~ data, c ~ prompts (replaced by the null condition with probability p_drop), eps ~ N(0, I)
    sigma = warp(sigmoid(N(0, 1)), shift)          (logit-normal, shifted)
    L_FM  = mean((v_theta(x_sigma, 1000 sigma, c) - (eps - x0))^2)

Student initialisation (CausVid / Self-Forcing "ODE init"): the teacher's deterministic trajectory from noise,
``x_{s_0} = eps -> ... -> x_{s_K} = x0_T`` (DDIM with CFG on a fine grid), is recorded at the levels of the
student's step lists; each training example picks a level per chunk (0 = the clean endpoint, what the KV cache
holds at inference) and the causal student regresses the endpoint from that mix::

    L_ODE = mean((x_t - sigma_t v_student(x_t, t | block-causal) - x0_T)^2)      with per-frame t

Shapes: clips ``[B, C, F, H, W]``, text states ``[B, L, D]``, trajectories ``[N, K, C, F, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from salt_ref.dmd import cfg as apply_cfg
from salt_ref.loop import Rng
from salt_ref.schedule import add_noise, flow_from_eps_x0, randn_like, sample_sigmas, sigma_to_t
from salt_ref.updates import ddim_update

__all__ = ["FlowMatchingTask", "ODEPairs", "teacher_trajectories", "ODERegressionTask"]

BatchFn = Callable[[torch.Generator], tuple[Tensor, Tensor, Tensor]]
"""``batch_fn(generator) -> (x0 [B, ...], context [B, L, D], null_context [B, L, D])``."""


class FlowMatchingTask:
    """Train ``model`` (the teacher) by conditional flow matching; the loop's EMA is the teacher to keep."""

    critic = None

    def __init__(self, model: nn.Module, batch_fn: BatchFn, *, cfg_dropout: float = 0.1, shift: float = 1.0):
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        self.generator, self.batch_fn, self.cfg_dropout, self.shift = model, batch_fn, cfg_dropout, shift

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        x0, ctx, null = self.batch_fn(rng.local)
        drop = torch.rand(x0.shape[0], generator=rng.local) < self.cfg_dropout
        ctx = torch.where(drop.to(ctx.device)[:, None, None], null, ctx)
        eps = randn_like(x0, rng.local)
        sigma = sample_sigmas(x0.shape[0], kind="logit_normal", shift=self.shift, generator=rng.local).to(x0)
        v = self.generator(add_noise(x0, eps, sigma), sigma_to_t(sigma), ctx)
        loss = (v - flow_from_eps_x0(eps, x0)).pow(2).mean()
        return loss, {"loss_fm": loss.item()}

    def critic_loss(self, it: int, rng: Rng):  # pragma: no cover - no critic
        raise AssertionError("flow matching has no critic")


@dataclass
class ODEPairs:
    """Teacher trajectories: ``states [N, K, ...]`` at ``levels [K]`` (last level 0: the endpoint), ``context``."""

    states: Tensor
    levels: Tensor
    context: Tensor

    @property
    def endpoint(self) -> Tensor:
        return self.states[:, -1]


@torch.no_grad()
def teacher_trajectories(
    teacher: nn.Module,
    noise: Tensor,
    context: Tensor,
    null_context: Tensor,
    grid: Tensor,
    record: Tensor,
    *,
    cfg_scale: float,
) -> ODEPairs:
    """Run the teacher's DDIM with CFG along ``grid [S + 1]`` from ``noise`` and keep the states at ``record``.

    ``grid``, ``record`` and ``cfg_scale`` come from the run's recipe (its shift and guidance); no defaults here.

    Every value of ``record`` must be a point of ``grid`` (include 0 to keep the endpoint).
    """
    idx = [int(torch.argmin((grid - r).abs())) for r in record.tolist()]
    if any(abs(float(grid[i]) - float(r)) > 1e-6 for i, r in zip(idx, record.tolist(), strict=True)):
        raise ValueError(f"record levels {record.tolist()} are not all on the grid {grid.tolist()}")
    x, states = noise, {}
    for i in range(grid.numel()):
        if i in idx:
            states[i] = x
        if i == grid.numel() - 1:
            break
        sigma = grid[i].to(x).expand(x.shape[0])
        v = teacher(torch.cat([x, x]), sigma_to_t(torch.cat([sigma, sigma])), torch.cat([context, null_context]))
        v_cond, v_null = v.chunk(2)
        x = ddim_update(x, sigma, grid[i + 1].to(x), apply_cfg(v_cond, v_null, cfg_scale))
    return ODEPairs(torch.stack([states[i] for i in idx], dim=1), record.clone(), context)


class ODERegressionTask:
    """Regress a causal student onto teacher endpoints from per-chunk noise levels (block-causal forward)."""

    critic = None

    def __init__(self, student: nn.Module, pairs: ODEPairs, *, batch: int, chunk_frames: int):
        if not student.config.causal:
            raise ValueError("the ODE initialisation trains a causal student (WanConfig(causal=True))")
        if float(pairs.levels[-1]) != 0.0:
            raise ValueError("the last recorded level must be 0 (the clean endpoint)")
        self.generator, self.pairs, self.batch, self.chunk = student, pairs, batch, chunk_frames

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        p = self.pairs
        n, k = p.states.shape[:2]
        frames = p.states.shape[3]
        n_chunks = -(-frames // self.chunk)
        idx = torch.randint(n, (self.batch,), generator=rng.local)
        level = torch.randint(k, (self.batch, n_chunks), generator=rng.local)
        level_f = level.repeat_interleave(self.chunk, dim=1)[:, :frames]  # [B, F]
        states = p.states[idx]  # [B, K, C, F, H, W]
        pick = level_f[:, None, None, :, None, None].expand(-1, 1, *states.shape[2:]).to(states.device)
        x = states.gather(1, pick)[:, 0]  # per frame, the state at that frame's chunk level
        sigma_f = p.levels.to(x)[level_f.to(x.device)]  # [B, F]
        v = self.generator(x, sigma_to_t(sigma_f), p.context[idx])
        x0_hat = x - sigma_f[:, None, :, None, None] * v
        loss = (x0_hat - p.endpoint[idx]).pow(2).mean()
        return loss, {"loss_ode": loss.item()}

    def critic_loss(self, it: int, rng: Rng):  # pragma: no cover - no critic
        raise AssertionError("ODE regression has no critic")

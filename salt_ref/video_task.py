r"""Few-step video distillation as a loop ``Task``: Self-Forcing, SC-DMD or Salt on any Wan-shaped model.

One class serves the toy video world (a ``tiny`` Wan) and Wan 1.3B/14B: the networks are
:class:`~salt_ref.models.wan.WanModel` s, the prompts come from a :class:`PromptSource`. Per micro-batch::

    (ctx, neg) ~ prompts;   eps ~ N(0, I) [B, C, F, H, W]
    x0   = chunk-wise rollout of the causal student through its KV cache         (salt_ref.cache_condition)
           (or one whole-video rollout for a bidirectional student, --causal false)
    real = teacher with CFG:  v_c + s (v_c - v_neg);   fake = critic(ctx)
    L_G  = L_DMD + lambda_SC L_SC [8-step draws] + w_align L_align [2-step draws exiting at 1, it >= start]

``self-forcing`` is the baseline (4-step list only, DMD only); ``sc-dmd`` mixes 8/4/2-step lists and adds the SC
term; ``salt`` adds the cache-aware reference path and the teacher-feature alignment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from salt_ref.cache_condition import chunked_rollout
from salt_ref.distill import AlignConfig, DMDObjective, StepLists, as_flow, default_rollout
from salt_ref.dmd import cfg as apply_cfg
from salt_ref.loop import Rng

__all__ = ["VIDEO_METHODS", "VideoTaskConfig", "PromptSource", "EmbeddingPrompts", "VideoDistillTask"]

VIDEO_METHODS = ("self-forcing", "sc-dmd", "salt")


@dataclass
class VideoTaskConfig:
    """The recipe (defaults: Salt on Wan 2.1 as released: 21 latent frames in chunks of 3, 480x832)."""

    method: str = "salt"
    latent: tuple[int, int, int, int] = (16, 21, 60, 104)  # C, F, H, W
    causal: bool = True
    chunk_frames: int = 3
    memory: str = "full"
    rope: str = "absolute"
    cfg_scale: float = 3.0
    shift: float = 5.0
    sc_weight: float = 0.2
    align_weight: float = 0.1
    align_start: int = 1000
    align_block: int = 20
    align_margin: float = 0.1
    context_sigma: float = 0.0
    batch: int = 1

    def __post_init__(self) -> None:
        if self.method not in VIDEO_METHODS:
            raise ValueError(f"unknown video method {self.method!r}; choose one of {list(VIDEO_METHODS)}")
        if self.method == "salt" and not self.causal:
            raise ValueError("salt's cache-aware alignment needs a causal student (a KV cache); use sc-dmd")
        if len(self.latent) != 4 or min(self.latent) < 1:
            raise ValueError(f"latent must be (C, F, H, W) with positive sizes, got {self.latent}")

    def to_dict(self) -> dict:
        return asdict(self)


class PromptSource(Protocol):
    """``sample(batch, generator) -> (context [B, L, D], negative [B, L, D])`` text states for one batch."""

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


class EmbeddingPrompts:
    """Precomputed text states from a safetensors file: ``context [N, L, D]`` and ``negative [L, D]``.

    The text encoder is not part of the method: encode the prompts once with Wan's umT5-XXL encoder (outside this
    library) and save its last hidden states; ``docs/full_scale.md`` gives the file format.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file

        data = load_file(path)
        missing = {"context", "negative"} - set(data)
        if missing:
            raise ValueError(f"prompt file {path} lacks tensors {sorted(missing)} (has {sorted(data)})")
        self.context, self.negative = data["context"], data["negative"]
        if self.context.ndim != 3:
            raise ValueError(f"'context' must be [N, L, D], got {tuple(self.context.shape)}")
        if self.negative.ndim == 3:
            self.negative = self.negative[0]
        if self.negative.ndim != 2 or self.negative.shape[-1] != self.context.shape[-1]:
            raise ValueError(f"'negative' must be [L, D={self.context.shape[-1]}], got {tuple(self.negative.shape)}")
        # one length for both, zero-padded as the Wan model pads text states (so CFG can batch them)
        length = max(self.context.shape[1], self.negative.shape[0])
        self.context = torch.nn.functional.pad(self.context, (0, 0, 0, length - self.context.shape[1]))
        self.negative = torch.nn.functional.pad(self.negative, (0, 0, 0, length - self.negative.shape[0]))
        self.device, self.dtype = device, dtype

    def __len__(self) -> int:
        return self.context.shape[0]

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self), (batch,), generator=generator)
        ctx = self.context[idx].to(self.device, self.dtype)
        neg = self.negative[None].expand(batch, -1, -1).to(self.device, self.dtype)
        return ctx, neg


class VideoDistillTask:
    """The loop's ``Task`` for video: student (generator), critic (fake score), frozen teacher (real score)."""

    def __init__(
        self,
        cfg: VideoTaskConfig,
        student: nn.Module,
        critic: nn.Module,
        teacher: nn.Module,
        prompts: PromptSource,
        *,
        device: torch.device | str = "cpu",
        autocast: torch.dtype | None = None,
        make_ema: Callable[[], nn.Module] | None = None,
    ):
        if cfg.causal and not student.config.causal:
            raise ValueError("cfg.causal is set but the student model is not causal (WanConfig(causal=True))")
        if teacher.config.causal or critic.config.causal:
            raise ValueError("teacher and critic must be bidirectional (they score whole clips)")
        if cfg.method == "salt" and cfg.align_block >= teacher.config.num_layers:
            raise ValueError(f"align_block {cfg.align_block} >= teacher's {teacher.config.num_layers} blocks")
        self.cfg, self.generator, self.critic, self.teacher = cfg, student, critic, teacher.requires_grad_(False)
        self.prompts, self.device, self.autocast = prompts, torch.device(device), autocast
        if make_ema is not None:
            self.make_ema = make_ema
        if cfg.method == "self-forcing":
            self.step_lists = StepLists(steps=(4,), probs=(1.0,), shift=cfg.shift)
        else:
            self.step_lists = StepLists(shift=cfg.shift)

    def _amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def objective(self, rng: Rng) -> DMDObjective:
        """The DMD objective for one prompt batch drawn from ``rng.local``."""
        cfg = self.cfg
        ctx, neg = self.prompts.sample(cfg.batch, rng.local)
        c, f, h, w = cfg.latent
        if cfg.causal:
            rollout_fn = partial(
                chunked_rollout,
                self.generator,
                context=ctx,
                chunk_frames=cfg.chunk_frames,
                policy=cfg.memory,
                rope=cfg.rope,
                context_sigma=cfg.context_sigma,
            )
        else:
            rollout_fn = default_rollout(as_flow(self.generator, context=ctx))

        def real_flow(x: Tensor, sigma: Tensor) -> Tensor:
            v = self.teacher(torch.cat([x, x]), torch.cat([sigma, sigma]) * 1000.0, torch.cat([ctx, neg]))
            v_cond, v_neg = v.chunk(2)
            return apply_cfg(v_cond, v_neg, cfg.cfg_scale)

        def features(x: Tensor, sigma: Tensor) -> Tensor:
            return self.teacher(x, sigma * 1000.0, ctx, features=(cfg.align_block,), features_only=True)[
                cfg.align_block
            ]

        align = None
        if cfg.method == "salt":
            align = AlignConfig(weight=cfg.align_weight, start=cfg.align_start, margin=cfg.align_margin)
        return DMDObjective(
            rollout_fn=rollout_fn,
            noise_fn=lambda g: torch.randn(cfg.batch, c, f, h, w, generator=g).to(self.device),
            real_flow=real_flow,
            fake_flow=as_flow(self.critic, context=ctx),
            step_lists=self.step_lists,
            shift=cfg.shift,
            sc_weight=cfg.sc_weight if cfg.method != "self-forcing" else 0.0,
            align=align,
            feature_fn=features if align is not None else None,
            frames=f,
        )

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        with self._amp():
            return self.objective(rng).generator_loss(rng.local, None, it, shared=rng.shared)

    def critic_loss(self, it: int, rng: Rng) -> tuple[Tensor, dict[str, float]]:
        with self._amp():
            return self.objective(rng).critic_loss(rng.local, shared=rng.shared)

r"""Few-step video distillation as a loop ``Task``: Self-Forcing, SC-DMD or Salt on any Wan-shaped model.

One class serves the toy video world (a ``tiny`` Wan) and Wan 1.3B/14B: the networks are
:class:`~salt_ref.models.wan.WanModel` s, the prompts come from a :class:`PromptSource`. Per micro-batch::

    (ctx, neg) ~ prompts;   eps ~ N(0, I) [B, C, F, H, W]
    x0   = chunk-wise rollout of the causal student through its KV cache         (salt_ref.cache_condition)
           (or one whole-video rollout for a bidirectional student, --causal false)
    real = teacher with CFG:  v_c + s (v_c - v_neg);   fake = critic(ctx)
    L_G  = L_DMD + lambda_SC L_SC [8-step draws] + w_align L_align [2-step draws exiting at 1, it >= start]

``self-forcing`` is the baseline (4-step list only, DMD only); ``sc-dmd`` mixes 8/4/2-step lists and adds the SC
term; ``salt`` adds the cache-aware reference path and the teacher-feature alignment. Every number above is the
run's :class:`~salt_ref.recipe.Recipe` (``salt_ref.recipe.METHOD_TERMS`` switches the terms per method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from salt_ref.cache_condition import chunked_rollout
from salt_ref.distill import DMDObjective, as_flow, default_rollout
from salt_ref.dmd import cfg as apply_cfg
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import Rng
from salt_ref.models.causal_flow import WanCausalFlow
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.schedule import sigma_to_t

__all__ = ["VIDEO_METHODS", "VideoTaskConfig", "PromptSource", "EmbeddingPrompts", "VideoDistillTask"]

VIDEO_METHODS = ("self-forcing", "sc-dmd", "salt")


@dataclass
class VideoTaskConfig:
    """What a video distillation run is (defaults: Salt on Wan 2.1 as released: 21 latent frames, 480x832).

    ``recipe`` holds the method's settings (shift, step lists, CFG, SC and alignment terms); it is stored with the
    terms of ``method`` switched on (:meth:`salt_ref.recipe.Recipe.for_method`). The chunk length is the causal
    student's (``WanConfig.chunk_frames``), the memory policy a parsed :class:`~salt_ref.kv_cache.MemoryPolicy`.
    """

    method: str = "salt"
    latent: tuple[int, int, int, int] = (16, 21, 60, 104)  # C, F, H, W
    causal: bool = True
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    rope: str = "absolute"
    batch: int = 1
    recipe: Recipe = field(default_factory=lambda: PRESETS["wan"])

    def __post_init__(self) -> None:
        if self.method not in VIDEO_METHODS:
            raise ValueError(f"unknown video method {self.method!r}; choose one of {list(VIDEO_METHODS)}")
        if not isinstance(self.memory, MemoryPolicy):
            raise TypeError(f"memory must be a MemoryPolicy (parse strings once, at the CLI), got {self.memory!r}")
        self.recipe = self.recipe.for_method(self.method)
        if self.recipe.align_on and not self.causal:
            raise ValueError("salt's cache-aware alignment needs a causal student (a KV cache); use sc-dmd")
        if len(self.latent) != 4 or min(self.latent) < 1:
            raise ValueError(f"latent must be (C, F, H, W) with positive sizes, got {self.latent}")

    def to_dict(self) -> dict:
        return {**asdict(self), "memory": str(self.memory)}


class PromptSource(Protocol):
    """``sample(batch, generator) -> (context [B, L, D], negative [B, L, D])`` text states for one batch."""

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


class EmbeddingPrompts:
    """Precomputed text states from a safetensors file: ``context [N, L, D]`` and ``negative [L, D]`` (or
    ``[1, L, D]``), as ``python -m salt_ref.encode_prompts`` writes them (umT5-XXL states; ``docs/full_scale.md``).

    The file is opened memory-mapped and only the rows a batch draws are read (``safe_open`` slices), so every
    rank of a large job reads its own prompts, not the whole file. Both are zero-padded to one length, as the
    Wan model pads text states, so CFG can batch them.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from safetensors import safe_open

        self.path, self.device, self.dtype = str(path), device, dtype
        with safe_open(self.path, framework="pt") as f:
            names = set(f.keys())
            missing = {"context", "negative"} - names
            if missing:
                raise ValueError(f"prompt file {path} lacks tensors {sorted(missing)} (has {sorted(names)})")
            shape = tuple(f.get_slice("context").get_shape())
            negative = f.get_tensor("negative")
        if len(shape) != 3 or shape[0] < 1:
            raise ValueError(f"prompt file {path}: 'context' must be [N >= 1, L, D], got {shape}")
        if negative.ndim == 3:
            negative = negative[0]
        if negative.ndim != 2 or negative.shape[-1] != shape[-1]:
            raise ValueError(f"prompt file {path}: 'negative' must be [L, D={shape[-1]}], got {tuple(negative.shape)}")
        self.n, self.width = shape[0], shape[2]
        self.length = max(shape[1], negative.shape[0])
        self.negative = self._pad(negative)

    def _pad(self, x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, self.length - x.shape[-2]))

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: Tensor) -> Tensor:
        """``context[idx]`` ``[len(idx), L, D]``, read from the file row by row."""
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice("context")
            return self._pad(torch.cat([sl[int(i) : int(i) + 1] for i in idx]))

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self), (batch,), generator=generator)
        ctx = self.rows(idx).to(self.device, self.dtype)
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
        r = cfg.recipe
        if r.align_on and r.align_block >= teacher.config.num_layers:
            raise ValueError(f"align_block {r.align_block} >= teacher's {teacher.config.num_layers} blocks")
        self.cfg, self.generator, self.critic, self.teacher = cfg, student, critic, teacher.requires_grad_(False)
        self.prompts, self.device, self.autocast = prompts, torch.device(device), autocast
        if make_ema is not None:
            self.make_ema = make_ema

    def amp(self):
        """The autocast region of every forward (bf16 when mixed precision is on; nothing otherwise)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def objective(self, rng: Rng) -> DMDObjective:
        """The DMD objective for one prompt batch drawn from ``rng.local``."""
        cfg, r = self.cfg, self.cfg.recipe
        ctx, neg = self.prompts.sample(cfg.batch, rng.local)
        c, f, h, w = cfg.latent
        if cfg.causal:
            flow = WanCausalFlow(self.generator, ctx, policy=cfg.memory, rope=cfg.rope)
            rollout_fn = partial(chunked_rollout, flow, context_sigma=r.context_sigma)
        else:
            rollout_fn = default_rollout(as_flow(self.generator, context=ctx))

        def real_flow(x: Tensor, sigma: Tensor) -> Tensor:
            v = self.teacher(torch.cat([x, x]), sigma_to_t(torch.cat([sigma, sigma])), torch.cat([ctx, neg]))
            v_cond, v_neg = v.chunk(2)
            return apply_cfg(v_cond, v_neg, r.cfg_scale)

        def features(x: Tensor, sigma: Tensor) -> Tensor:
            block = r.align_block
            return self.teacher(x, sigma_to_t(sigma), ctx, features=(block,), features_only=True)[block]

        return DMDObjective(
            recipe=r,
            rollout_fn=rollout_fn,
            noise_fn=lambda g: torch.randn(cfg.batch, c, f, h, w, generator=g).to(self.device),
            real_flow=real_flow,
            fake_flow=as_flow(self.critic, context=ctx),
            feature_fn=features if r.align_on else None,
            frames=f,
        )

    def generator_loss(self, it: int, rng: Rng, ema: nn.Module) -> tuple[Tensor, dict[str, float]]:
        with self.amp():
            return self.objective(rng).generator_loss(rng.local, None, it, shared=rng.shared)

    def critic_loss(self, it: int, rng: Rng) -> tuple[Tensor, dict[str, float]]:
        with self.amp():
            return self.objective(rng).critic_loss(rng.local, shared=rng.shared)

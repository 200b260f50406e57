r"""Chunk-wise generation of any length with a causal student, through the one chunked rollout.

Each chunk of ``chunk_frames`` latent frames is denoised along the recipe's inference list (the re-noise sampler,
as trained) while attending to the memory of earlier chunks; its output is then written into the memory by the
context pass (``salt_ref.cache_condition.chunked_rollout``)::

    sigmas = recipe.sample_sigmas(steps)                      warped by recipe.shift, terminal 0
    x_c    = rollout(G(. | memory), eps_c, sigmas)            chunk c, all steps, no gradient
    memory <- write(x_c at recipe.context_sigma)

:func:`generate` keeps a KV cache under a memory policy (flat cost per chunk under a bounded policy, and with
window-relative RoPE it runs past the trained length); :func:`generate_without_cache` is the same rollout over the
prefix-recomputing network (``salt_ref.models.causal_flow.WanPrefixFlow``), the reference the cache speeds up.
Both draw the same noise in the same order, so they agree sample for sample.

Shapes: ``context [B, L, D]``; output ``[B, C, F, H, W]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salt_ref.cache_condition import chunked_rollout
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.models.causal_flow import CausalFlow, WanCausalFlow, WanPrefixFlow
from salt_ref.models.wan import WanModel
from salt_ref.recipe import Recipe

__all__ = ["generate", "generate_without_cache"]


@torch.no_grad()
def _generate(
    flow: CausalFlow,
    model: WanModel,
    context: Tensor,
    frames: int,
    size: tuple[int, int],
    recipe: Recipe,
    steps: int | None,
    generator: torch.Generator | None,
):
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    noise = torch.randn(context.shape[0], model.config.in_dim, frames, *size, generator=generator)
    return chunked_rollout(
        flow,
        noise.to(context),
        recipe.sample_sigmas(steps).to(context),
        generator=generator,
        grad_exit=False,
        context_sigma=recipe.context_sigma,
    )


def generate(
    model: WanModel,
    context: Tensor,
    *,
    frames: int,
    size: tuple[int, int],
    recipe: Recipe,
    steps: int | None = None,
    memory: MemoryPolicy | None = None,
    rope: str = "absolute",
    generator: torch.Generator | None = None,
    return_times: bool = False,
) -> Tensor | tuple[Tensor, list[float]]:
    """A ``[B, C, frames, H, W]`` video from a causal ``model`` conditioned on ``context``, through a KV cache.

    Args:
        recipe: the schedule (shift, ``sample_steps``, context level) the student was trained with.
        steps: sampling steps (default ``recipe.sample_steps``).
        memory: the cache's memory policy (default full); ``rope``: ``absolute`` or window-``relative`` positions.
        return_times: also return the wall-clock seconds of each chunk (flat under bounded policies).
    """
    flow = WanCausalFlow(model, context, policy=memory or MemoryPolicy(), rope=rope)
    ro = _generate(flow, model, context, frames, size, recipe, steps, generator)
    return (ro.x0, ro.chunk_seconds) if return_times else ro.x0


def generate_without_cache(
    model: WanModel,
    context: Tensor,
    *,
    frames: int,
    size: tuple[int, int],
    recipe: Recipe,
    steps: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`generate` with full memory, recomputing the finished prefix at every step instead of caching it."""
    return _generate(WanPrefixFlow(model, context), model, context, frames, size, recipe, steps, generator).x0

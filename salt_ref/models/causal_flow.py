r"""The causal-flow interface that chunk-wise rollouts take, and its two Wan implementations.

A chunk-wise rollout (``salt_ref.cache_condition.chunked_rollout``) needs three things of a causal network
conditioned on one prompt batch, and nothing else::

    memory = new_cache(batch, frames, (H, W), device)     the memory of earlier chunks (empty)
    v      = flow(memory, start)(x_c, sigma)             the flow of chunk [start, start + F_c) at level sigma [B],
                                                          attending to the memory
    write(memory, x_c, sigma_ctx, start)                 store a finished chunk (the context pass at sigma_ctx)

:class:`WanCausalFlow` keeps a per-layer KV cache (``salt_ref.kv_cache``) under a memory policy: the chunk's
queries attend to the cached keys of kept frames plus its own. :class:`WanPrefixFlow` keeps the finished chunks
themselves and re-runs the whole prefix through one block-causal forward at every call (earlier chunks at
``t = 1000 sigma_ctx``, the current chunk at its level, full memory): the slow reference that the cache speeds
up. Both map ``t = 1000 sigma`` through ``salt_ref.schedule``. Shapes: chunks ``[B, C, F_c, H, W]``,
``context [B, L, D]``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from salt_ref.kv_cache import KVCache, MemoryPolicy
from salt_ref.models.wan import WanModel
from salt_ref.schedule import sigma_to_t
from salt_ref.updates import FlowFn

__all__ = ["CausalFlow", "WanCausalFlow", "WanPrefixFlow"]


class CausalFlow(Protocol):
    """What a chunk-wise rollout calls: a memory, the flow through it, and the write of a finished chunk."""

    chunk_frames: int

    def new_cache(self, batch: int, frames: int, size: tuple[int, int], device: torch.device) -> Any: ...

    def flow(self, cache: Any, start: int) -> FlowFn: ...

    def write(self, cache: Any, x: Tensor, sigma: float, start: int) -> None: ...


def _check_causal(model: WanModel) -> None:
    if not model.config.causal:
        raise ValueError("a chunk-wise rollout needs a causal model (WanConfig(causal=True))")


class WanCausalFlow:
    """A causal :class:`~salt_ref.models.wan.WanModel` through per-layer KV caches under ``policy``.

    Args:
        model: the causal student; ``context``: its text states ``[B, L, D]`` for every call.
        policy: which earlier frames each chunk attends to (``full``, ``window(n)``, ``sink(s)+window(n)``).
        rope: ``"absolute"`` or window-``"relative"`` RoPE positions.
    """

    def __init__(self, model: WanModel, context: Tensor, *, policy: MemoryPolicy, rope: str = "absolute"):
        _check_causal(model)
        if not isinstance(policy, MemoryPolicy):
            raise TypeError(
                f"policy must be a MemoryPolicy (parse strings once with MemoryPolicy.parse), got {policy!r}"
            )
        self.model, self.context, self.policy, self.rope = model, context, policy, rope
        self.chunk_frames = model.config.chunk_frames

    def new_cache(self, batch: int, frames: int, size: tuple[int, int], device: torch.device) -> list[KVCache]:
        # under autocast the keys are computed in the autocast dtype (bf16 at scale): store them so, not in fp32
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        return self.model.new_cache(
            self.policy, batch=batch, frames_hw=size, max_frames=frames, rope=self.rope, device=device, dtype=dtype
        )

    def flow(self, cache: list[KVCache], start: int) -> FlowFn:
        return lambda x, sigma: self.model(x, sigma_to_t(sigma), self.context, kv_cache=cache, start_frame=start)

    def write(self, cache: list[KVCache], x: Tensor, sigma: float, start: int) -> None:
        t = sigma_to_t(torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype))
        with torch.no_grad():
            self.model(x, t, self.context, kv_cache=cache, start_frame=start, commit=True)


class WanPrefixFlow:
    """A causal :class:`~salt_ref.models.wan.WanModel` without a cache: every call re-runs the finished prefix.

    The memory is the list of finished chunks (as written, at level ``sigma_ctx``); the flow of a chunk is the
    block-causal forward of ``[prefix, chunk]`` with per-frame levels ``[sigma_ctx ..., sigma ...]``, sliced to
    the chunk. Equal to :class:`WanCausalFlow` under the ``full`` policy up to float rounding.
    """

    def __init__(self, model: WanModel, context: Tensor):
        _check_causal(model)
        self.model, self.context = model, context
        self.chunk_frames = model.config.chunk_frames

    def new_cache(self, batch: int, frames: int, size: tuple[int, int], device: torch.device) -> dict[str, Any]:
        return {"chunks": [], "levels": []}

    def flow(self, cache: dict[str, Any], start: int) -> FlowFn:
        def flow_fn(x: Tensor, sigma: Tensor) -> Tensor:
            done = sum(c.shape[2] for c in cache["chunks"])
            if done != start:
                raise ValueError(f"chunk starts at frame {start}, but the prefix holds {done} frames")
            b, f = x.shape[0], x.shape[2]
            levels = [lv.expand(b, c.shape[2]) for lv, c in zip(cache["levels"], cache["chunks"], strict=True)]
            sig = torch.cat([*levels, sigma.to(x.dtype)[:, None].expand(b, f)], dim=1)
            v = self.model(torch.cat([*cache["chunks"], x], dim=2), sigma_to_t(sig), self.context)
            return v[:, :, start:]

        return flow_fn

    def write(self, cache: dict[str, Any], x: Tensor, sigma: float, start: int) -> None:
        cache["chunks"].append(x.detach())
        cache["levels"].append(torch.full((x.shape[0], 1), sigma, dtype=x.dtype, device=x.device))

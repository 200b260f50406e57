r"""The KV cache as a condition whose quality varies: chunk-wise rollouts that write it, and their reference.

A causal student generates a video chunk by chunk (chunks of ``chunk_frames`` latent frames). Chunk ``c`` is
denoised by the backward-simulated rollout of ``salt_ref.updates`` along a step list, attending to the cache of
earlier chunks; its output is then written into the cache by a *context pass*::

    x0_c = rollout(G(. | cache), eps_c, sigmas, exit = k)                    (steps < k without gradient)
    cache <- K,V of G(add_noise(sg(x0_c), eps', sigma_ctx) | cache)         (sigma_ctx = 0 by default)

The network is reached only through the causal-flow interface (``salt_ref.models.causal_flow``: a memory, the
flow through it, the write of a finished chunk), so one rollout serves the KV-cached student, the
prefix-recomputing reference and the cache-quality experiment (a ``writer`` hook picks what a chunk writes).

The cache's *quality* is the number of steps K of the rollout that wrote it. In cache-aware training the
student's 2-step rollout writes a low-quality (LQ) cache; a *reference path* (the same student, no gradient, the
same chunk noise ``eps_c``, the 4-step grid down to the student's exit level) writes its own outputs into a
second, high-quality (HQ) cache. ``x0_ref`` is compared with ``x0`` by ``salt_ref.feature_align``. The reference
path replays the chunk's own random draws (its re-noising noise and context-pass noise start from the generator
state the student's chunk started from): with common random numbers, ``x0 - x0_ref`` is the grid's and the cache's
doing, not two draws' (on the student's own grid the two paths are identical).

Shapes: ``noise [B, C, F, H, W]``; chunks split ``F``; ``context [B, L, D_text]``; outputs ``[B, C, F, H, W]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from salt_ref.models.causal_flow import CausalFlow
from salt_ref.schedule import add_noise, randn_like
from salt_ref.updates import FlowFn, OnExit, Rollout, rollout

__all__ = ["ChunkedRollout", "Writer", "chunk_bounds", "reference_exit_index", "chunked_rollout"]


def chunk_bounds(n_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """``[(0, c), (c, 2c), ...]`` covering ``n_frames`` (the last chunk may be shorter)."""
    if n_frames < 1 or chunk_frames < 1:
        raise ValueError(f"need n_frames >= 1 and chunk_frames >= 1, got {n_frames}, {chunk_frames}")
    return [(s, min(s + chunk_frames, n_frames)) for s in range(0, n_frames, chunk_frames)]


def reference_exit_index(ref_sigmas: Tensor, sigma_exit: float, atol: float = 1e-6) -> int:
    """Index of the student's exit level on the reference grid (the reference stops there)."""
    hits = [i for i, s in enumerate(ref_sigmas[:-1].tolist()) if abs(s - sigma_exit) < atol]
    if not hits:
        raise ValueError(f"exit level {sigma_exit:.4f} is not on the reference grid {ref_sigmas.tolist()}")
    return hits[0]


@dataclass
class ChunkedRollout(Rollout):
    """A :class:`~salt_ref.updates.Rollout` over chunks: every tensor is the chunks' concatenated along ``F``."""

    chunks: list[tuple[int, int]] | None = None
    chunk_seconds: list[float] | None = None  # wall time per chunk (its rollout, reference path and context pass)


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=2)  # type: ignore[arg-type]


Writer = Callable[[FlowFn, Tensor, Tensor, "torch.Generator | None"], Tensor]
"""``writer(flow_c, x0_c, noise_c, replay) -> what to write``: the tensor a finished chunk leaves in the memory.

``flow_c`` is the chunk's flow through the current memory, ``noise_c`` its starting noise and ``replay`` a generator
that repeats the draws the chunk's own rollout made (``None`` without a generator), so a writer can roll the same
chunk out again, on another grid, with common random numbers."""


def chunked_rollout(
    flow: CausalFlow,
    noise: Tensor,
    sigmas: Tensor,
    *,
    exit_index: int | None = None,
    generator: torch.Generator | None = None,
    grad_exit: bool = True,
    on_exit: OnExit | None = None,
    reference_sigmas: Tensor | None = None,
    context_sigma: float = 0.0,
    writer: Writer | None = None,
    mode: str = "renoise",
) -> ChunkedRollout:
    """Chunk-by-chunk backward simulation of a causal network through its memory (and an optional HQ reference).

    Args:
        flow: the causal network on one prompt batch (:class:`~salt_ref.models.causal_flow.CausalFlow`: a KV
            cache under a memory policy, or the prefix-recomputing reference); it sets the chunk length.
        noise: starting noise of the whole video ``[B, C, F, H, W]`` (chunk ``c`` uses its frames).
        sigmas: the step list ``[K + 1]``; every chunk exits at ``exit_index`` (shared, as Self-Forcing).
        on_exit: evaluated per chunk at its exit step, with the chunk's memory current (SC-DMD's target).
        reference_sigmas: if given, also run the reference path on this grid down to the exit level, with its
            own memory; its outputs are returned as ``x0_ref``.
        context_sigma: noise level of the context pass that writes each finished chunk into the memory.
        writer: what a finished chunk writes (default: its own output ``x0_c``); e.g. the cache-quality experiment
            writes a 4-step output of the same chunk into an HQ memory while showing the 2-step one.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, F, H, W], got {tuple(noise.shape)}")
    b, _, n_f, h, w = noise.shape
    bounds = chunk_bounds(n_f, flow.chunk_frames)
    k_exit = sigmas.numel() - 2 if exit_index is None else exit_index
    cache = flow.new_cache(b, n_f, (h, w), noise.device)
    ref_cache, k_ref = None, None
    if reference_sigmas is not None:
        ref_cache = flow.new_cache(b, n_f, (h, w), noise.device)
        k_ref = reference_exit_index(reference_sigmas, float(sigmas[k_exit]))

    def clock() -> float:
        # on CUDA the host runs ahead of the device: wait for the chunk's work, or its seconds are launch times
        if noise.device.type == "cuda":
            torch.cuda.synchronize(noise.device)
        return time.perf_counter()

    def write(memory: Any, x0: Tensor, start: int, gen: torch.Generator | None) -> None:
        with torch.no_grad():
            ctx = add_noise(x0.detach(), randn_like(x0, gen), context_sigma)
            flow.write(memory, ctx, context_sigma, start)

    def replay_of(gen: torch.Generator | None) -> torch.Generator | None:
        """A generator that repeats ``gen``'s next draws (common random numbers), or ``None``."""
        if gen is None:
            return None
        copy = torch.Generator(gen.device)
        copy.set_state(gen.get_state())
        return copy

    per_chunk: list[Rollout] = []
    refs: list[Tensor] = []
    seconds: list[float] = []
    for s, e in bounds:
        t0 = clock()
        flow_c = flow.flow(cache, s)
        replay = replay_of(generator) if writer is not None else None
        ref_draws = replay_of(generator) if ref_cache is not None else None
        ro = rollout(
            flow_c,
            noise[:, :, s:e],
            sigmas,
            mode=mode,
            generator=generator,
            exit_index=k_exit,
            grad_exit=grad_exit,
            on_exit=on_exit,
        )
        per_chunk.append(ro)
        context_draws = replay_of(generator) if ref_cache is not None else None  # the context pass's noise, replayed
        if writer is None:
            write(cache, ro.x0, s, generator)
        else:
            with torch.no_grad():
                write(cache, writer(flow_c, ro.x0, noise[:, :, s:e], replay), s, generator)
        if ref_cache is not None:
            with torch.no_grad():
                ref = rollout(
                    flow.flow(ref_cache, s),
                    noise[:, :, s:e],
                    reference_sigmas,
                    mode=mode,
                    generator=ref_draws,
                    exit_index=k_ref,
                    grad_exit=False,
                )
            refs.append(ref.x0)
            write(ref_cache, ref.x0, s, context_draws)
        seconds.append(clock() - t0)
    steps = range(k_exit + 1)
    return ChunkedRollout(
        states=[torch.cat([ro.states[i] for ro in per_chunk], dim=2) for i in steps],
        x0s=[torch.cat([ro.x0s[i] for ro in per_chunk], dim=2) for i in steps],
        sigmas=sigmas,
        exit_index=k_exit,
        v_exit=torch.cat([ro.v_exit for ro in per_chunk], dim=2),
        exit_extra=_cat([ro.exit_extra for ro in per_chunk]),
        x0_ref=torch.cat(refs, dim=2) if refs else None,
        chunks=bounds,
        chunk_seconds=seconds,
    )

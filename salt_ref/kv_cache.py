r"""Key/value memory for chunk-wise autoregressive attention, with memory policies.

A video is generated chunk by chunk (frames ``[s_c, e_c)`` for chunk ``c``). Each attention layer keeps the
keys/values of frames already generated; a chunk's queries attend to the kept frames plus the chunk itself.
Which frames are kept is the *memory policy* (``n`` and ``sink`` count frames)::

    full              keys g < e_c                                   (everything generated so far)
    window(n)         keys g < e_c  and  g >= e_c - n                (the last n frames, current chunk included)
    sink(s)+window(n) keys g < e_c  and (g >= e_c - n  or  g < s)    (the first s frames are kept forever)

so chunk-wise attention through the cache equals one block-causal attention over the whole sequence with the
mask :func:`attention_mask` (the defining property, tested over random chunkings).

Keys are stored *before* RoPE, with their absolute frame index. Rotary phases are applied when attending, at
either the absolute frame positions (``rope="absolute"``) or positions re-assigned inside the kept window
(``rope="relative"``: kept frames get ``0..N-1`` in order, the current chunk the last positions), so generation
can run past the trained length and past the RoPE table. For ``window(n)`` without a sink the two give the same
attention (RoPE scores depend only on position differences); with a sink they differ by design.

Bounded policies preallocate ``sink + n`` frames; committing a chunk evicts the oldest non-sink frames by an
in-place shift, so memory never grows. Tensors: keys/values ``[B, L, H, D]`` with ``L = frames * tokens_per_frame``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MemoryPolicy", "KVCache", "attention_mask", "frame_mask"]


@dataclass(frozen=True)
class MemoryPolicy:
    """``kind`` is ``full``, ``window`` or ``sink``; ``window`` and ``sink`` count frames."""

    kind: str = "full"
    window: int | None = None
    sink: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("full", "window", "sink"):
            raise ValueError(f"unknown memory policy {self.kind!r}; choose full, window or sink")
        if self.kind == "full" and (self.window is not None or self.sink):
            raise ValueError("the full policy takes no window or sink")
        if self.kind in ("window", "sink") and (self.window is None or self.window < 1):
            raise ValueError(f"the {self.kind} policy needs a window >= 1 frame, got {self.window}")
        if self.kind == "window" and self.sink:
            raise ValueError("use kind='sink' for a sink plus a window")
        if self.kind == "sink" and self.sink < 1:
            raise ValueError(f"the sink policy needs sink >= 1 frame, got {self.sink}")

    @classmethod
    def parse(cls, spec: str) -> MemoryPolicy:
        """``"full"``, ``"window:12"`` or ``"sink:3+window:12"``."""
        spec = spec.strip().lower()
        if spec == "full":
            return cls()
        if m := re.fullmatch(r"window:(\d+)", spec):
            return cls("window", int(m[1]))
        if m := re.fullmatch(r"sink:(\d+)\+window:(\d+)", spec):
            return cls("sink", int(m[2]), int(m[1]))
        raise ValueError(f"cannot parse memory policy {spec!r}; use full, window:N or sink:S+window:N")

    @property
    def bounded(self) -> bool:
        return self.kind != "full"

    def kept_frames(self, n_past: int, chunk_end: int) -> list[int]:
        """Absolute indices of past frames ``g < n_past`` a chunk ending at ``chunk_end`` may attend to."""
        if self.kind == "full":
            return list(range(n_past))
        lo = chunk_end - self.window
        return [g for g in range(n_past) if g >= lo or g < self.sink]

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        return f"window:{self.window}" if self.kind == "window" else f"sink:{self.sink}+window:{self.window}"


def frame_mask(chunk_bounds: list[tuple[int, int]], policy: MemoryPolicy) -> Tensor:
    """Boolean ``[F, F]`` mask (query frame, key frame) of block-causal attention under ``policy``."""
    n_frames = chunk_bounds[-1][1]
    mask = torch.zeros(n_frames, n_frames, dtype=torch.bool)
    for s, e in chunk_bounds:
        if policy.bounded and e - s > policy.window:
            raise ValueError(f"chunk [{s}, {e}) is longer than the attention window of {policy.window} frames")
        mask[s:e, s:e] = True
        for g in policy.kept_frames(s, e):
            mask[s:e, g] = True
    return mask


def attention_mask(chunk_bounds: list[tuple[int, int]], policy: MemoryPolicy, tokens_per_frame: int) -> Tensor:
    """Token-level ``[L, L]`` boolean mask (True = attend) from :func:`frame_mask`."""
    m = frame_mask(chunk_bounds, policy)
    return m.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class KVCache:
    """One layer's key/value memory. ``view(k_new, v_new)`` gives what the current chunk attends to;
    ``commit(k_new, v_new)`` stores the chunk (the Self-Forcing context pass does this, once per chunk).

    Args:
        policy: which past frames are kept.
        batch: ``B`` of the ``[B, L, H, D]`` keys.
        heads: ``H``.
        head_dim: ``D``.
        tokens_per_frame: tokens of one frame (``L`` is a multiple of it).
        max_frames: capacity of the ``full`` policy (bounded policies allocate ``sink + window`` frames).
        rope: ``"absolute"`` frame positions, or ``"relative"`` (re-assigned inside the kept window).
    """

    def __init__(
        self,
        policy: MemoryPolicy,
        *,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        rope: str = "absolute",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if rope not in ("absolute", "relative"):
            raise ValueError(f"rope must be 'absolute' or 'relative', got {rope!r}")
        for name, value, low in (("batch", batch, 0), ("heads", heads, 1), ("head_dim", head_dim, 1)):
            if value < low:
                raise ValueError(f"KVCache: {name} must be >= {low}, got {value}")
        if tokens_per_frame <= 0:
            raise ValueError(f"KVCache: tokens_per_frame must be >= 1, got {tokens_per_frame}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"KVCache: max_frames must be >= 1, got {max_frames}")
        self.policy, self.tpf, self.rope = policy, tokens_per_frame, rope
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        if policy.bounded:
            self.capacity = policy.sink + policy.window
        elif max_frames is None:
            raise ValueError("the full policy needs max_frames (the longest video it will hold)")
        else:
            self.capacity = max_frames
        shape = (batch, self.capacity * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.frames = torch.full((self.capacity,), -1, dtype=torch.long)  # absolute index held in each slot
        self.n_held = 0  # slots in use
        self.next_frame = 0  # absolute index of the next frame to commit

    def _check(self, k: Tensor, v: Tensor, start_frame: int) -> int:
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must both be [B, L, H, D]")
        b, length, h, d = k.shape
        if (b, h, d) != (self.batch, self.heads, self.head_dim):
            raise ValueError(
                f"chunk has batch/heads/head_dim {(b, h, d)}, cache holds {(self.batch, self.heads, self.head_dim)}"
            )
        if length % self.tpf:
            raise ValueError(f"chunk of {length} tokens is not a whole number of {self.tpf}-token frames")
        return self._check_frames(length // self.tpf, start_frame)

    def _check_frames(self, n_new: int, start_frame: int) -> int:
        if start_frame != self.next_frame:
            raise ValueError(f"chunk starts at frame {start_frame}, but the cache expects frame {self.next_frame}")
        if self.policy.bounded and n_new > self.policy.window:
            raise ValueError(f"a chunk of {n_new} frames does not fit a window of {self.policy.window} frames")
        if not self.policy.bounded and self.n_held + n_new > self.capacity:
            # checked for view too: a chunk that can be read but never committed would fail one pass later
            raise ValueError(f"full cache overflow: {self.n_held} + {n_new} frames exceed max_frames={self.capacity}")
        return n_new

    def kept_slots(self, chunk_end: int) -> list[int]:
        """Slots (in order) of held frames the chunk ending at ``chunk_end`` may attend to."""
        keep = set(self.policy.kept_frames(self.next_frame, chunk_end))
        return [i for i in range(self.n_held) if int(self.frames[i]) in keep]

    def read(self, n_new: int, start_frame: int) -> tuple[Tensor, Tensor, Tensor]:
        """What a chunk of ``n_new`` frames at ``start_frame`` attends to in the cache, taken now.

        Returns keys, values ``[B, L_kept, H, D]`` (stored dtype, un-roped) and the absolute index of each kept
        frame ``[N_kept]``. Where the kept frames fill one run of slots (every policy without a sink) the tensors
        are views of the cache, no copy; a sink plus a window is gathered. Taking the read before the chunk's
        blocks run makes it a plain input: an activation-checkpointed block recomputed in backward sees the
        same keys, not the cache as later chunks left it.
        """
        n_new = self._check_frames(n_new, start_frame)
        slots = self.kept_slots(start_frame + n_new)
        t = self.tpf
        if slots and slots == list(range(slots[0], slots[-1] + 1)):
            a, b = slots[0] * t, (slots[-1] + 1) * t
            k, v = self.k[:, a:b], self.v[:, a:b]
        elif slots:
            idx = (torch.tensor(slots)[:, None] * t + torch.arange(t)).reshape(-1).to(self.k.device)
            k, v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        else:
            k, v = self.k[:, :0], self.v[:, :0]
        return k, v, self.frames[slots]

    def view(self, k_new: Tensor, v_new: Tensor, start_frame: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values ``[B, L', H, D]`` and absolute frame index per key token ``[L']`` for a new chunk."""
        n_new = self._check(k_new, v_new, start_frame)
        k_past, v_past, past = self.read(n_new, start_frame)
        frames = torch.cat([past, torch.arange(start_frame, start_frame + n_new)])
        k = torch.cat([k_past.to(k_new.dtype), k_new], dim=1)
        v = torch.cat([v_past.to(v_new.dtype), v_new], dim=1)
        return k, v, frames.repeat_interleave(self.tpf)

    def positions(self, key_frames: Tensor, n_new: int) -> tuple[Tensor, Tensor]:
        """RoPE frame positions ``(keys [L'], queries [n_new * tpf])`` for the tokens :meth:`view` returned."""
        keys, queries = self.frame_positions(key_frames[:: self.tpf], n_new)
        return keys.repeat_interleave(self.tpf), queries.repeat_interleave(self.tpf)

    def frame_positions(self, frames: Tensor, n_new: int) -> tuple[Tensor, Tensor]:
        """RoPE positions per frame ``(keys [N], queries [n_new])`` of the kept frames then the chunk's ``frames``."""
        if self.rope == "absolute":
            return frames, frames[-n_new:]
        # rank of each key's frame among the kept frames: 0..N-1 in order, the chunk takes the last ranks
        _, rank = torch.unique(frames, sorted=True, return_inverse=True)
        return rank, rank[-n_new:]

    @torch.no_grad()
    def commit(self, k_new: Tensor, v_new: Tensor, start_frame: int) -> None:
        """Store a finished chunk (detached). Bounded policies evict the oldest non-sink frames in place."""
        n_new = self._check(k_new, v_new, start_frame)
        if self.n_held + n_new > self.capacity:  # bounded policies only: _check refused a full cache's overflow
            sink = min(self.policy.sink, self.n_held)
            evict = self.n_held + n_new - self.capacity
            t, keep_from = self.tpf, sink + evict
            # shift the surviving window frames down over the evicted ones (sink slots stay put)
            self.k[:, sink * t : (self.n_held - evict) * t] = self.k[:, keep_from * t : self.n_held * t].clone()
            self.v[:, sink * t : (self.n_held - evict) * t] = self.v[:, keep_from * t : self.n_held * t].clone()
            self.frames[sink : self.n_held - evict] = self.frames[keep_from : self.n_held].clone()
            self.n_held -= evict
        a, b = self.n_held * self.tpf, (self.n_held + n_new) * self.tpf
        self.k[:, a:b] = k_new.detach().to(self.k.dtype)
        self.v[:, a:b] = v_new.detach().to(self.v.dtype)
        self.frames[self.n_held : self.n_held + n_new] = torch.arange(start_frame, start_frame + n_new)
        self.n_held += n_new
        self.next_frame += n_new

    def reset(self) -> None:
        self.frames.fill_(-1)
        self.n_held = 0
        self.next_frame = 0

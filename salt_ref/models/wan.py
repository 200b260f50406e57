r"""The Wan 2.1 text-to-video DiT, one class at every scale (``tiny`` on a CPU, ``1.3B``, ``14B``).

With ``d = dim``, ``n`` heads of ``hd = d / n`` and patch ``(1, 2, 2)``::

    tokens  z = Conv3d_patch(x)                       x [B, C, F, H, W] -> z [B, L, d], L = F * (H/2) * (W/2)
    time    e = MLP(sinusoid_256(t))  [B, F_t, d];    e0 = Linear(SiLU(e)) -> 6 modulations [B, F_t, 6, d]
    text    c = MLP_gelu(context)     [B, 512, d]     (context zero-padded to text_len, as the official code)
    block   (m_i = e0 + modulation_i: shift/scale/gate for attention and FFN)
            z = z + g_sa  * SelfAttn(LN(z) (1 + scale_sa) + shift_sa)         RMS q/k norm over d, 3D RoPE
            z = z + CrossAttn(LN_affine(z), c)                                 no modulation, no gate
            z = z + g_ffn * FFN_gelu_tanh(LN(z) (1 + scale_ffn) + shift_ffn)
    head    v = Linear(LN(z) (1 + scale) + shift),  (shift, scale) = head.modulation + e;  unpatchify -> [B, C, F, H, W]

3D RoPE splits each head's channels into frame/row/column parts of ``hd - 4(hd//6)``, ``2(hd//6)``, ``2(hd//6)``
with interleaved (real, imag) pairs and ``theta = 10000``. ``t`` is ``[B]`` or per frame ``[B, F]`` (causal
students denoise chunks at their own levels). Parameter names follow the official checkpoint, so its state dict
loads as is; the loader, :func:`~salt_ref.models.wan_weights.load_checkpoint` in
:mod:`salt_ref.models.wan_weights` (re-exported here with its key mappings and :class:`CheckpointKeyError`), also
reads the diffusers and ComfyUI layouts.

``causal=True`` gives block-causal attention over chunks of ``chunk_frames`` frames: without a cache through one
masked attention (:func:`salt_ref.kv_cache.attention_mask`), with a list of per-layer
:class:`~salt_ref.kv_cache.KVCache` one chunk at a time. Teacher, critic and causal student are this class.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from salt_ref.kv_cache import KVCache, MemoryPolicy, attention_mask

# The weights loader lives in wan_weights (which imports this module only for type hints, so no cycle); its public
# names stay importable from here, where callers have always found them.
from salt_ref.models.wan_weights import CheckpointKeyError, from_diffusers_keys, load_checkpoint, to_diffusers_keys

__all__ = [
    "WanConfig",
    "WanModel",
    "PRESETS",
    "rope_frequencies",
    "apply_rope",
    "load_checkpoint",
    "to_diffusers_keys",
    "from_diffusers_keys",
    "CheckpointKeyError",
]


_ROPE_TABLES_KEPT = 64  # RoPE tables a model keeps per process: a few per chunk position and grid


@dataclass(frozen=True)
class WanConfig:
    """Architecture of one Wan DiT (official field names); ``causal``/``chunk_frames`` choose the attention."""

    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_len: int = 1024
    causal: bool = False
    chunk_frames: int = 3

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2 or self.dim // self.num_heads < 6:
            raise ValueError(f"head_dim {self.dim // self.num_heads} must be even and >= 6 for 3D RoPE")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> WanConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # Toy video world: RGB clips, a handful of class tokens standing in for the prompt.
    "tiny": WanConfig(
        in_dim=3,
        out_dim=3,
        dim=128,
        ffn_dim=512,
        freq_dim=64,
        text_dim=32,
        text_len=8,
        num_heads=4,
        num_layers=4,
        chunk_frames=2,
    ),
    "1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


# ----------------------------------------------------------------------------------------------- RoPE


def rope_frequencies(head_dim: int, max_len: int = 1024, theta: float = 10000.0) -> Tensor:
    """Angles ``[max_len, head_dim / 2]`` (float64): frame, row and column ladders side by side."""
    d_hw = 2 * (head_dim // 6)
    parts = []
    for d_axis in (head_dim - 2 * d_hw, d_hw, d_hw):
        inv = 1.0 / theta ** (torch.arange(0, d_axis, 2, dtype=torch.float64, device="cpu") / d_axis)
        parts.append(torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv))
    return torch.cat(parts, dim=1)


def rope_angles(freqs: Tensor, head_dim: int, f_pos: Tensor, h: int, w: int) -> Tensor:
    """Per-token angles ``[L, head_dim / 2]`` for frames ``f_pos [F]`` on an ``h x w`` grid, (f, h, w) order."""
    c = head_dim // 2
    c_t, c_hw = c - 2 * (c // 3), c // 3
    if int(f_pos.max()) >= freqs.shape[0] or h > freqs.shape[0] or w > freqs.shape[0]:
        raise ValueError(f"positions exceed the RoPE table of {freqs.shape[0]}; use window-relative RoPE")
    ft = freqs[f_pos.long(), :c_t][:, None, None, :].expand(-1, h, w, -1)
    fh = freqs[:h, c_t : c_t + c_hw][None, :, None, :].expand(f_pos.numel(), -1, w, -1)
    fw = freqs[:w, c_t + c_hw :][None, None, :, :].expand(f_pos.numel(), h, -1, -1)
    return torch.cat([ft, fh, fw], dim=-1).reshape(-1, c)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2j], x[2j+1])`` of ``x [B, L, H, hd]`` by ``angles [L, hd/2]`` (in float64)."""
    xd = x.double().unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    re_, im = xd[..., 0], xd[..., 1]
    out = torch.stack([re_ * cos - im * sin, re_ * sin + im * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in float32 (Wan's q/k norm over the whole ``d``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (or the input's dtype if wider), affine or not (Wan's ``norm1/2/3``).

    The affine weight and bias are cast to the compute dtype too (CPU layer_norm rejects mixed dtypes, so a
    float64 model failed at ``norm3`` before).
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with q/k RMS norm; self-attention uses RoPE and the KV cache."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, L, H, hd]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))

    def forward_cross(self, x: Tensor, context: Tensor) -> Tensor:
        q = self._split(self.norm_q(self.q(x)))
        k = self._split(self.norm_k(self.k(context)))
        return self.attend(q, k, self._split(self.v(context)), None)

    def forward_self(
        self, x: Tensor, rope: dict, past: tuple[Tensor, Tensor] | None, mask: Tensor | None, commit_to: KVCache | None
    ) -> Tensor:
        """Self-attention; ``past`` is the cache's kept keys/values ``[B, L_kept, H, hd]`` (un-roped) read before
        the block ran, ``rope["q"]`` / ``rope["k"]`` the angles of the query and key tokens."""
        q = self._split(self.norm_q(self.q(x)))
        k = self._split(self.norm_k(self.k(x)))
        v = self._split(self.v(x))
        if past is None:
            return self.attend(apply_rope(q, rope["q"]), apply_rope(k, rope["q"]), v, mask)
        k_all = torch.cat([past[0].to(k.dtype), k], dim=1)
        v_all = torch.cat([past[1].to(v.dtype), v], dim=1)
        out = self.attend(apply_rope(q, rope["q"]), apply_rope(k_all, rope["k"]), v_all, None)
        if commit_to is not None:
            commit_to.commit(k, v, rope["start"])  # stored un-roped and detached, after this chunk has read it
        return out


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        context: Tensor,
        rope: dict,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        commit_to: KVCache | None = None,
    ) -> Tensor:
        """``x [B, F, S, d]`` grouped by frame; ``e0 [B, F_t, 6, d]`` with ``F_t`` in {1, F}; ``past`` the kept
        keys/values of the KV cache (read before the block: its inputs are fixed for a checkpoint recompute)."""
        mod = (self.modulation.float()[:, None] + e0.float()).unbind(2)  # 6 x [B, F_t, d]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, :, None] for m in mod)
        b, f, s, d = x.shape
        flat = lambda y: y.reshape(b, f * s, d)  # noqa: E731
        y = self.self_attn.forward_self(
            flat(self.norm1(x).float() * (1 + scale_sa) + shift_sa).to(x.dtype), rope, past, mask, commit_to
        )
        x = x + y.reshape(b, f, s, d) * gate_sa
        x = x + self.cross_attn.forward_cross(flat(self.norm3(x)), context).reshape(b, f, s, d)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ff) + shift_ff).to(x.dtype))
        return x + y * gate_ff


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)
        # in fp32 (or wider) even under bf16 autocast, as official Wan runs its head
        return linear_fp32(self.head, self.norm(x).float() * (1 + scale[:, :, None]) + shift[:, :, None])


def linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in float32 (or the weight's dtype if wider), outside any autocast region.

    Wan keeps the time embedding and the head in fp32 under bf16 autocast; with bf16 parameters (FSDP mixed
    precision) the weights are upcast here, so the same code runs under every precision policy and on the CPU.
    """
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def sinusoid(t: Tensor, dim: int) -> Tensor:
    """``[cos(t w_j), sin(t w_j)]`` with ``w_j = 10000^(-j / (dim/2))``, computed in float64 (cos first)."""
    half = dim // 2
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.double()[..., None] * w
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


# ---------------------------------------------------------------------------------------------- model


class WanModel(nn.Module):
    """``forward(x [B, C, F, H, W], t [B] | [B, F], context [B, L, text_dim]) -> flow [B, C, F, H, W]``."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # Not a buffer: it must stay float64 through .to(dtype) and out of the state dict (as upstream).
        self.freqs = rope_frequencies(cfg.head_dim, cfg.rope_max_len)
        self.gradient_checkpointing = False
        self._rope_tables: OrderedDict[tuple, Tensor] = OrderedDict()  # (device, positions, h, w) -> angles

    # -- helpers ------------------------------------------------------------------------------------
    def _angles(self, f_pos: Tensor, h: int, w: int, device: torch.device) -> Tensor:
        """Token angles ``[F h w, hd/2]`` for frame positions ``f_pos``, built on ``device`` once per distinct
        (positions, grid) and kept (a chunk-wise video asks for the same few tables at every layer and step)."""
        key = (str(device), tuple(f_pos.tolist()), h, w)
        table = self._rope_tables.get(key)
        if table is None:
            freqs = self._rope_tables.get((str(device), "freqs"))
            if freqs is None:
                freqs = self._rope_tables[(str(device), "freqs")] = self.freqs.to(device)
            table = self._rope_tables[key] = rope_angles(freqs, self.config.head_dim, f_pos.to(device), h, w)
            while len(self._rope_tables) > _ROPE_TABLES_KEPT:
                self._rope_tables.popitem(last=False)
        else:
            self._rope_tables.move_to_end(key)
        return table

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(
                f"frames/height/width {tuple(x.shape[2:])} must be multiples of the patch {cfg.patch_size}"
            )
        if t.shape not in ((x.shape[0],), (x.shape[0], x.shape[2])):
            raise ValueError(
                f"t must be [B]={x.shape[0]} or [B, F]={tuple(x.shape[:1] + x.shape[2:3])}, got {tuple(t.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")

    def new_cache(
        self,
        policy: MemoryPolicy,
        *,
        batch: int,
        frames_hw: tuple[int, int],
        max_frames: int | None = None,
        rope: str = "absolute",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """One :class:`KVCache` per block for videos of latent size ``H x W`` (``frames_hw``)."""
        if not isinstance(policy, MemoryPolicy):  # strings are parsed once, where they are read (the CLI)
            raise TypeError(f"policy must be a MemoryPolicy: use MemoryPolicy.parse({policy!r})")
        cfg = self.config
        tpf = (frames_hw[0] // cfg.patch_size[1]) * (frames_hw[1] // cfg.patch_size[2])
        p = next(self.parameters())
        return [
            KVCache(
                policy,
                batch=batch,
                heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                tokens_per_frame=tpf,
                max_frames=max_frames,
                rope=rope,
                dtype=dtype or p.dtype,
                device=device or p.device,
            )
            for _ in self.blocks
        ]

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        *,
        kv_cache: list[KVCache] | None = None,
        start_frame: int = 0,
        commit: bool = False,
        policy: MemoryPolicy | None = None,
        chunk_bounds: list[tuple[int, int]] | None = None,
        features: Iterable[int] = (),
        features_only: bool = False,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]] | dict[int, Tensor]:
        """Flow prediction.

        Args:
            x: noisy latents ``[B, C, F, H, W]`` (one chunk when ``kv_cache`` is given).
            t: timesteps ``1000 sigma``, ``[B]`` or per frame ``[B, F]``.
            context: text states ``[B, L <= text_len, text_dim]`` (zero-padded to ``text_len`` here).
            kv_cache: per-block caches (causal models): attend to the cached frames plus this chunk.
            start_frame: absolute index of the chunk's first frame (with ``kv_cache``).
            commit: also write this chunk's keys/values into the cache (the context pass, after it attended).
            policy: memory policy of a causal forward without cache (default: full memory).
            chunk_bounds: its chunks as ``[(start, end), ...]`` (default: chunks of ``config.chunk_frames``).
            features: block indices whose output hidden states ``[B, L, d]`` are returned too.
            features_only: stop after the last requested block and return only ``{block: hidden states}``
                (the alignment's teacher pass needs nothing later).
        """
        cfg = self.config
        self._check_inputs(x, t, context)
        if features_only and not set(features):
            raise ValueError("features_only=True needs at least one block index in features")
        b, _, n_f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        fp, hp, wp = n_f // pt, h // ph, w // pw
        z = self.patch_embedding(x).flatten(2).transpose(1, 2).reshape(b, fp, hp * wp, cfg.dim)

        t_frames = t[:, None] if t.ndim == 1 else t[:, ::pt]
        # time embedding and its projection in fp32 even under bf16 autocast (as official Wan)
        lin1, lin2, proj = self.time_embedding[0], self.time_embedding[2], self.time_projection[1]
        e = linear_fp32(lin2, F.silu(linear_fp32(lin1, sinusoid(t_frames, cfg.freq_dim))))
        e0 = linear_fp32(proj, F.silu(e)).unflatten(-1, (6, cfg.dim))  # [B, F_t, 6, d]
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        c = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

        angles = lambda f_pos: self._angles(f_pos, hp, wp, x.device)  # noqa: E731
        mask = None
        rope: dict = {"start": start_frame}
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        pasts: list[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)
        if kv_cache is not None:
            if not cfg.causal:
                raise ValueError("a KV cache needs a causal model (WanConfig(causal=True))")
            if len(kv_cache) != len(self.blocks):
                raise ValueError(f"kv_cache has {len(kv_cache)} layers, the model {len(self.blocks)}")
            if commit and checkpointing:
                raise ValueError("commit=True is a no-grad context pass: run it under torch.no_grad()")
            # every layer's cache is read now, before any block runs: the reads are the blocks' inputs, so a
            # checkpointed block recomputed in backward sees these keys, not the cache as later chunks left it
            reads = [c.read(fp, start_frame) for c in kv_cache]
            frames = torch.cat([reads[0][2], torch.arange(start_frame, start_frame + fp)])
            key_pos, query_pos = kv_cache[0].frame_positions(frames, fp)
            rope.update(q=angles(query_pos), k=angles(key_pos))  # one table per forward, shared by every layer
            # a bounded cache shifts its slots in place on later commits: a checkpoint must keep its own copy
            keep = checkpointing and kv_cache[0].policy.bounded
            pasts = [(k.clone(), v.clone()) if keep else (k, v) for k, v, _ in reads]
        else:
            if commit:
                raise ValueError("commit=True needs a kv_cache")
            rope["q"] = angles(torch.arange(fp))
            if cfg.causal:
                bounds = chunk_bounds or [(s, min(s + cfg.chunk_frames, fp)) for s in range(0, fp, cfg.chunk_frames)]
                mask = attention_mask(bounds, policy or MemoryPolicy(), hp * wp).to(x.device)

        feats: dict[int, Tensor] = {}
        wanted = set(features)
        for i, block in enumerate(self.blocks):
            commit_to = kv_cache[i] if commit else None
            if checkpointing:
                z = checkpoint(block, z, e0, c, rope, pasts[i], mask, use_reentrant=False)
            else:
                z = block(z, e0, c, rope, pasts[i], mask, commit_to)
            if i in wanted:
                feats[i] = z.reshape(b, fp * hp * wp, cfg.dim)
                if features_only and len(feats) == len(wanted):
                    return feats
        out = self.head(z, e).float()  # [B, F', S, prod(patch) * C], fp32
        out = out.reshape(b, fp, hp, wp, pt, ph, pw, cfg.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(b, cfg.out_dim, n_f, h, w)
        return (out, feats) if wanted else out

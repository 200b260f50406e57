r"""The memory plan of a full-scale run (``python -m salt_ref.train --scale full --dry-run``), from a meta build.

Per GPU, for ``P`` trainable parameters sharded N ways and the frozen teacher's ``P_T``::

    weights fp32 4P/N  +  grads fp32 4P/N  +  AdamW (m, v) fp32 8P/N  +  EMA fp32 4P/N  (student only)
    frozen teacher bf16 2P_T/N;  one unsharded bf16 block in flight (x2 with prefetch)
    student backward   n_chunks * layers * [B, L_chunk, d] fp32   (checkpointed block inputs: the residual
                       stream is fp32, the fp32 gates promote it)
    KV cache           2 * layers * F * (H/2)(W/2) * d bf16 per rollout (x2 with Salt's reference path)
    teacher CFG        [2B, L, d] fp32 residual + max(bf16 FFN intermediate [2B, L, d_ffn],
                       RoPE's float64 temporaries 2 x 8 bytes + the fp32 input, per element of [2B, L, d])
    alignment          (align_block + 1) * [B, L, d] fp32 (backward through the teacher's first blocks)

No weight is read or allocated: the three networks are built on the meta device and only counted.
"""

from __future__ import annotations

import argparse

import torch

from salt_ref.models.wan import WanConfig, WanModel

__all__ = ["parse_latent", "model_configs", "plan"]


def parse_latent(spec: str) -> tuple[int, int, int, int]:
    """``"16x21x60x104"`` as ``(C, F, H, W)``."""
    try:
        c, f, h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--latent must be CxFxHxW, got {spec!r}") from None
    return c, f, h, w


def model_configs(args: argparse.Namespace) -> tuple[WanConfig, WanConfig, WanConfig]:
    """Student (causal unless ``--causal false``), critic and teacher configs of a ``--scale full`` command."""
    student = WanConfig.preset(args.model, causal=args.causal, chunk_frames=args.chunk_frames)
    critic = WanConfig.preset(args.model)
    teacher = WanConfig.preset(args.teacher_model)
    return student, critic, teacher


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def plan(args: argparse.Namespace, world: int) -> str:
    """The memory plan of a run, from a meta-device build (no weights are read)."""
    s_cfg, c_cfg, t_cfg = model_configs(args)
    with torch.device("meta"):
        counts = {
            name: sum(p.numel() for p in WanModel(cfg).parameters())
            for name, cfg in (("student", s_cfg), ("critic", c_cfg), ("teacher", t_cfg))
        }
    c, f, h, w = parse_latent(args.latent)
    tokens_per_frame = (h // 2) * (w // 2)
    chunk_tokens = args.chunk_frames * tokens_per_frame
    accum = max(1, args.total_batch // (world * args.batch_per_gpu))
    rows = []
    per_gpu = {}
    for name, n in counts.items():
        trainable = name != "teacher"
        weights = (4 if trainable else 2) * n / world
        grads = 4 * n / world if trainable else 0
        optim = 8 * n / world if trainable else 0
        ema = 4 * n / world if name == "student" else 0
        per_gpu[name] = weights + grads + optim + ema
        rows.append(
            f"| {name} | {n:,} | {_gib(weights)} | {_gib(grads)} | {_gib(optim)} | {_gib(ema)} | "
            f"{_gib(per_gpu[name])} |"
        )
    d_s, d_t = s_cfg.dim, t_cfg.dim
    block_bf16 = max(2 * (8 * d**2 + 2 * d * cfg.ffn_dim) for d, cfg in ((d_s, s_cfg), (d_t, t_cfg)))
    kv = 2 * s_cfg.num_layers * f * tokens_per_frame * d_s * 2 * args.batch_per_gpu
    n_chunks = -(-f // args.chunk_frames)
    b = args.batch_per_gpu
    # every chunk's exit step carries gradient into the one DMD loss on the whole clip; the residual stream is
    # fp32 (the fp32 gates promote it), so each checkpointed block input is [B, L_chunk, d] in 4 bytes
    act_student = n_chunks * s_cfg.num_layers * chunk_tokens * d_s * 4 * b
    clip_tokens = f * tokens_per_frame
    # no-grad CFG pass at batch 2B (cond + negative), one block at a time: the fp32 residual stream, plus the larger
    # of the bf16 FFN intermediate and RoPE's float64 temporaries (q or k in float64 and its rotated copy: 2 x 8 bytes
    # per element of [2B, L, d], with the float32 input alongside)
    rope_temps = 2 * b * clip_tokens * d_t * (8 + 8 + 4)
    teacher_transient = 2 * b * clip_tokens * d_t * 4 + max(2 * b * clip_tokens * t_cfg.ffn_dim * 2, rope_temps)
    # Salt's alignment backpropagates through teacher blocks 0..align_block into x0: checkpointed fp32 block inputs
    align_acts = (args.align_block + 1) * b * clip_tokens * d_t * 4 if args.method == "salt" else 0
    total = sum(per_gpu.values()) + 2 * block_bf16 + kv * (2 if args.method == "salt" else 1)
    lines = [
        f"plan: {args.method} on Wan ({'causal' if args.causal else 'bidirectional'} student), {world} GPU(s)",
        f"latent {c}x{f}x{h}x{w}: {tokens_per_frame} tokens/frame, chunks of {args.chunk_frames} frames "
        f"({chunk_tokens} tokens); total batch {args.total_batch} = {world} GPUs x {args.batch_per_gpu} x "
        f"{accum} accumulation steps",
        "",
        "| model | parameters | weights/GPU | grads/GPU | AdamW/GPU | EMA/GPU | total/GPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"unsharded block in flight (bf16, x2 with prefetch): {_gib(2 * block_bf16)}",
        f"KV cache per rollout (bf16, {s_cfg.num_layers} layers x {f} frames): {_gib(kv)}"
        + (" (x2: Salt's reference path keeps its own)" if args.method == "salt" else ""),
        f"student backward, {n_chunks} chunks with checkpointing (fp32 block inputs): {_gib(act_student)}",
        f"teacher CFG forward on the whole clip (no grad, one block at a time; fp32 residual, max of bf16 FFN and "
        f"float64 RoPE temporaries {_gib(rope_temps)}): ~{_gib(teacher_transient)}",
        f"alignment backward through teacher blocks 0..{args.align_block} (checkpointed fp32 inputs): "
        f"{_gib(align_acts)}",
        f"estimated peak per GPU (sharded states + blocks in flight + caches + the larger transient): "
        f"{_gib(total + max(teacher_transient, align_acts + act_student))}",
    ]
    return "\n".join(lines)

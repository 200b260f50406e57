"""Micro-benchmark: our ``WanModel`` against diffusers' ``WanTransformer3DModel`` at the ``tiny`` preset, on CPU.

What it measures: wall-clock time of one training step's compute, forward + backward of
``loss = mean(out**2)`` (gradients for all parameters and none for the inputs), fp32, bidirectional attention,
for the two implementations holding *identical* weights: diffusers' model is randomised, saved as a
diffusers-layout safetensors file and read into ours with :func:`salt_ref.models.wan.load_checkpoint` (so the
key converter is exercised too). Before timing it checks that the outputs and the parameter gradients of the
two agree. Timings are the median over ``--repeats`` steps after ``--warmup`` steps, the two models
alternating step by step so that load from other processes hits both alike; ``--threads`` sets
``torch.set_num_threads``. Not measured: optimizer step, data loading, memory.

Example::

    python scripts/bench_wan_tiny.py --threads 1 --batch 2 --frames 8 --size 16 --repeats 10
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from salt_ref.models.wan import WanConfig, WanModel, from_diffusers_keys, load_checkpoint
from salt_ref.schedule import sigma_to_t


def diffusers_model(cfg: WanConfig, seed: int):
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_len,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


def step(model, call, inputs) -> float:
    """One forward + backward; returns seconds."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = call(model, *inputs)
    out.float().pow(2).mean().backward()
    return time.perf_counter() - start


def call_ours(model, x, t, context):
    return model(x, t, context)


def call_diffusers(model, x, t, context):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8, help="latent frames F")
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = WanConfig.preset("tiny")
    theirs = diffusers_model(cfg, args.seed).train()
    ours = WanModel(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diffusion_pytorch_model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in theirs.state_dict().items()}, str(path))
        load_checkpoint(ours, path)

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, cfg.in_dim, args.frames, args.size, args.size, generator=g)
    t = sigma_to_t(torch.rand(args.batch, generator=g))  # a random noise level per sample, as the network sees it
    context = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g)
    inputs = (x, t, context)

    # correctness: outputs and parameter gradients agree (relative to their scale)
    step(ours, call_ours, inputs)
    step(theirs, call_diffusers, inputs)
    with torch.no_grad():
        a, b = call_ours(ours, *inputs), call_diffusers(theirs, *inputs)
    out_err = ((a - b).abs().max() / b.abs().max()).item()
    their_grads = {from_diffusers_keys(k): p.grad for k, p in theirs.named_parameters()}
    grad_err = max(
        ((p.grad - their_grads[k]).abs().max() / their_grads[k].abs().max().clamp_min(1e-12)).item()
        for k, p in ours.named_parameters()
    )
    if out_err > 1e-4 or grad_err > 1e-3:
        raise SystemExit(f"outputs differ: relative output error {out_err:.3g}, gradient error {grad_err:.3g}")

    for _ in range(args.warmup):
        step(ours, call_ours, inputs)
        step(theirs, call_diffusers, inputs)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        times["ours"].append(step(ours, call_ours, inputs))
        times["diffusers"].append(step(theirs, call_diffusers, inputs))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}

    tokens = args.frames // cfg.patch_size[0] * (args.size // cfg.patch_size[1]) * (args.size // cfg.patch_size[2])
    import diffusers

    print(f"command: python {shlex.join(['scripts/bench_wan_tiny.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(
        f"WanConfig.preset('tiny'), fp32, x {list(x.shape)} ({tokens} tokens/sample), text_len {cfg.text_len}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}; "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"check: max |ours - diffusers| / max |diffusers| = {out_err:.2e} (output), {grad_err:.2e} (worst grad)")
    print()
    print("| forward + backward | ours ms | diffusers ms | ours / diffusers |")
    print("|---|---:|---:|---:|")
    print(
        f"| B={args.batch}, F={args.frames}, {args.size}x{args.size} | {ms['ours']:.1f} | {ms['diffusers']:.1f} | "
        f"{ms['ours'] / ms['diffusers']:.2f} |"
    )


if __name__ == "__main__":
    main()

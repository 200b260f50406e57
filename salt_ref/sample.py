r"""Command line: videos of any length from a trained student (``salt_ref.generate`` does the work).

Generation is chunk-wise through the KV cache, along the recipe (its shift and inference list); with a bounded
memory policy and window-relative RoPE the cost per chunk stays flat and it runs past the trained length.

Small scale (a run of ``python -m salt_ref.train --scale small``), GIF or mp4 of the latent-free toy world::

    python -m salt_ref.sample --run runs/small-salt --frames 32 --memory window:6 --rope relative --out v.gif

Full scale (Wan 2.1): the prompt through umT5 (``salt_ref.encode_prompts``), the causal student's latents
``[1, 16, F, H/8, W/8]`` with ``F = (frames - 1) / 4 + 1``, decoded by the Wan VAE (``salt_ref.video_io``) into an
mp4 of ``frames`` frames at 16 fps; per-chunk timings, FPS and (on CUDA) peak memory are printed::

    python -m salt_ref.sample --scale full --student student_ema.safetensors --wan-dir Wan2.1-T2V-1.3B \
        --prompt "a red fox in the snow" --frames 81 --memory sink:3+window:12 --rope relative --out video.mp4

Bad input (a missing run or file, an unparsable ``--memory``, a label out of range, ``--frames`` or ``--steps``
< 1, a full-scale ``--frames`` that is not 4n + 1, an ``--out`` that is neither ``.gif`` nor ``.mp4``, or ``.mp4``
without the imageio-ffmpeg package) prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor

from salt_ref.cli import Parser, memory_policy, positive_int
from salt_ref.generate import generate

__all__ = ["main"]

VIDEO_SUFFIXES = (".gif", ".mp4")


def _video_out_error(out: Path) -> str | None:
    """Why ``out`` cannot be written, checked before any work: the suffix, and mp4's ffmpeg plugin."""
    if out.suffix not in VIDEO_SUFFIXES:
        return f"--out {out}: the video format comes from the suffix, give .gif or .mp4"
    if out.suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        return (
            f"--out {out}: writing .mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); or write a .gif"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    scale = Parser(add_help=False)
    scale.add_argument("--scale", choices=("small", "full"), default="small")
    known, _ = scale.parse_known_args(argv)
    if known.scale == "full":
        return main_full(argv)
    p = Parser(
        prog="python -m salt_ref.sample",
        description="Videos of any length from a trained student, chunk by chunk through the KV cache. These are "
        "the small scale's flags; for Wan: --scale full --help.",
    )
    p.add_argument("--scale", choices=("small", "full"), default="small", help="small: a toy-world run; full: Wan")
    p.add_argument("--run", required=True, help="a small-scale run directory (config.json + checkpoint)")
    p.add_argument("--frames", type=positive_int, default=None, help="frames to generate (default: the trained length)")
    p.add_argument(
        "--memory", type=memory_policy, default=None, help="full, window:N or sink:S+window:N (default: the run's)"
    )
    p.add_argument(
        "--rope",
        choices=["absolute", "relative"],
        default=None,
        help="absolute: positions from the video's start; relative: from the memory window's (default: the run's)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the run's recipe)")
    p.add_argument("--label", type=int, nargs="+", default=None, help="class label(s) to generate (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", default=None, help="output .gif or .mp4 (default: <run>/sample.gif)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # one error: line, code 2, returned like the other failures
        return int(e.code or 0)
    from toy.run_video import load_run
    from toy.video_world import save_video

    out = Path(args.out or Path(args.run) / "sample.gif")
    if (msg := _video_out_error(out)) is not None:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        model, cfg, prompts = load_run(Path(args.run))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_classes = prompts.world.n_classes
    if args.label is not None and not all(0 <= k < n_classes for k in args.label):
        print(f"error: --label must be in 0..{n_classes - 1}, got {args.label}", file=sys.stderr)
        return 2
    labels = torch.tensor(args.label or list(range(n_classes)))
    frames = cfg.frames if args.frames is None else args.frames
    g = torch.Generator().manual_seed(args.seed)
    try:
        video = generate(
            model,
            prompts.embed(labels),
            frames=frames,
            size=(cfg.size, cfg.size),
            recipe=cfg.recipe,
            steps=args.steps,
            memory=args.memory or cfg.memory,
            rope=args.rope or cfg.rope,
            generator=g,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_video(video, out)
    print(f"wrote {out}: {len(labels)} clips x {frames} frames")
    return 0


def _full_parser() -> Parser:
    from salt_ref.recipe import PRESETS

    p = Parser(prog="python -m salt_ref.sample --scale full", description="a Wan 2.1 video from a causal student")
    p.add_argument("--scale", choices=("small", "full"), default="full", help="small: a toy-world run; full: Wan")
    p.add_argument("--student", required=True, help="the causal student (safetensors: python -m salt_ref.convert)")
    p.add_argument("--wan-dir", help="Wan 2.1 folder (umT5 weights + google/umt5-xxl tokenizer, Wan2.1_VAE.pth)")
    p.add_argument("--prompt", help="text prompt (encoded with umT5 here)")
    p.add_argument("--prompts", help="or: a prompt file from salt_ref.encode_prompts, with --row")
    p.add_argument("--row", type=int, default=0, help="row of --prompts")
    p.add_argument("--frames", type=positive_int, default=81, help="video frames, 4n + 1 (81: 21 latent frames)")
    p.add_argument("--size", default="832x480", help="width x height in pixels (multiples of 16)")
    p.add_argument("--model", choices=["tiny", "1.3B", "14B"], default="1.3B", help="the student's size")
    p.add_argument("--chunk-frames", type=positive_int, default=3, help="latent frames per chunk (as trained)")
    p.add_argument("--memory", type=memory_policy, default="full", help="full, window:N or sink:S+window:N")
    p.add_argument(
        "--rope",
        choices=["absolute", "relative"],
        default="absolute",
        help="absolute: positions from the video's start; relative: from the memory window's (as trained)",
    )
    p.add_argument("--steps", type=positive_int, default=PRESETS["wan"].sample_steps, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or a diffusers VAE folder (default: <wan-dir>/Wan2.1_VAE.pth)")
    p.add_argument("--vae-config", help="JSON of AutoencoderKLWan settings for a .pth VAE (default: Wan 2.1's)")
    p.add_argument("--t5-config", help="UMT5Config JSON for the prompt encoder (default: umT5-XXL)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="video.mp4", help="output .mp4")
    return p


def _encode_one(args, device: str) -> Tensor:
    """The prompt's umT5 states ``[1, L, D]``, through ``salt_ref.encode_prompts`` (one code path for both)."""
    import tempfile

    from salt_ref.encode_prompts import main as encode_main
    from salt_ref.video_task import EmbeddingPrompts

    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        rows = EmbeddingPrompts(str(path))
        if not 0 <= args.row < len(rows):
            raise ValueError(f"--row must be in 0..{len(rows) - 1}, got {args.row}")
        return rows.rows(torch.tensor([args.row]))
    if args.prompt is None or args.wan_dir is None:
        raise ValueError("give --prompt with --wan-dir (or a precomputed --prompts file)")
    with tempfile.TemporaryDirectory() as tmp:
        text, out = Path(tmp) / "prompt.txt", Path(tmp) / "prompt.safetensors"
        text.write_text(args.prompt + "\n")
        flags = ["--wan-dir", args.wan_dir, "--prompts", str(text), "--out", str(out), "--negative", "", "--quiet"]
        flags += ["--device", device] + (["--t5-config", args.t5_config] if args.t5_config else [])
        if encode_main(flags) != 0:
            raise ValueError("the prompt could not be encoded (see the error above)")
        return EmbeddingPrompts(str(out)).rows(torch.tensor([0]))


def main_full(argv: list[str] | None = None) -> int:
    """``--scale full``: prompt -> umT5 -> causal student through the KV cache -> Wan VAE -> mp4."""
    import json
    import time

    try:
        args = _full_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from salt_ref.models.wan import WanConfig, WanModel, load_checkpoint
    from salt_ref.recipe import PRESETS
    from salt_ref.video_io import decode_latents, load_wan_vae, write_mp4

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (msg := _video_out_error(Path(args.out))) is not None or Path(args.out).suffix != ".mp4":
        print(f"error: {msg or f'--out {args.out}: the full scale writes .mp4'}", file=sys.stderr)
        return 2
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        if width % 16 or height % 16:
            raise ValueError(f"--size {args.size}: width and height must be multiples of 16")
        if (args.frames - 1) % 4:
            raise ValueError(f"--frames must be 4n + 1 (the VAE's time stride is 4), got {args.frames}")
        vae_path = args.vae or (str(Path(args.wan_dir) / "Wan2.1_VAE.pth") if args.wan_dir else None)
        if vae_path is None:
            raise ValueError("give --vae or --wan-dir (for its Wan2.1_VAE.pth)")
        overrides = json.loads(Path(args.vae_config).read_text()) if args.vae_config else None
        context = _encode_one(args, device)
        cfg = WanConfig.preset(args.model, causal=True, chunk_frames=args.chunk_frames)
        with torch.device("meta"):
            model = WanModel(cfg)
        model.to_empty(device=device)
        load_checkpoint(model, args.student)
        model.eval().requires_grad_(False)
        vae = load_wan_vae(vae_path, device=device, config_overrides=overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    latent_frames = (args.frames - 1) // 4 + 1
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):  # the trained precision
        latents, seconds = generate(
            model,
            context.to(device, torch.float32),
            frames=latent_frames,
            size=(height // 8, width // 8),
            recipe=PRESETS["wan"],
            steps=args.steps,
            memory=args.memory,
            rope=args.rope,
            generator=g,
            return_times=True,
        )
    t_gen = time.perf_counter() - t0
    video = decode_latents(vae, latents.float())[0]
    t_all = time.perf_counter() - t0
    out = write_mp4(video, args.out, fps=16)
    report = {
        "out": str(out),
        "frames": int(video.shape[1]),
        "latent_frames": latent_frames,
        "chunk_seconds": [round(x, 4) for x in seconds],
        "generate_seconds": round(t_gen, 3),
        "decode_seconds": round(t_all - t_gen, 3),
        "fps_generate": round(video.shape[1] / t_gen, 2),
        "fps_with_decode": round(video.shape[1] / t_all, 2),
    }
    if device.startswith("cuda"):
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

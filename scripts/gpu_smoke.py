r"""One-GPU smoke test of the full-scale path: ``python scripts/gpu_smoke.py --out smoke.json`` (one H100/H200).

What it measures, one section at a time. A failing section is recorded and the next one still runs; CUDA memory
is freed and the peak counter reset between sections:

- ``env``: torch and CUDA versions, the GPU's name and memory.
- ``train_tiny``: ``torchrun --standalone --nproc_per_node 1 -m salt_ref.train --scale full`` with tiny random
  student/critic/teacher checkpoints and a prompt file written to a temp dir (as ``tests/test_full.py`` does):
  activation checkpointing, bf16 autocast, FSDP2 mixed precision and NCCL (gloo without CUDA), a causal student
  with a ``window:2`` cache and Salt's alignment from iteration 0, 3 iterations. The loop's collectives run on
  the model's device, and NCCL refuses CPU tensors, so this section is the GPU proof of that placement. Reports
  the losses of every iteration from ``metrics.jsonl``, whether ``loss_align`` appeared, the final JSON line,
  the wall time and, on CUDA, how many ``NCCL INFO`` lines the run logged (``NCCL_DEBUG=INFO``).
- ``generate_1p3b``: a random-weight causal 1.3B (``chunk_frames=3``) built on the GPU in bf16 generates 21 latent
  frames at 480x832 (latent 16x21x60x104, 81 video frames) in 4 steps through the KV cache
  (``salt_ref.generate.generate``, full memory, bf16 autocast, a random ``[1, 512, 4096]`` context), after an
  untimed warm-up (two chunks, one step). Reports per-chunk and total seconds, latent and video frames per second,
  the peak memory, and the SDPA backend: ``sdpa.probe`` tries FLASH, EFFICIENT, CUDNN and MATH alone on the
  model's query/key layout, ``sdpa.ran`` lists the backends whose aten kernels the profiler saw in the model's own
  attention during the warm-up. Then 42 latent frames (twice the trained length) under ``sink:3+window:12`` with
  window-relative RoPE: per-chunk seconds, and whether they stay flat once the window is full (``flat``: max/min
  of the steady chunks <= 1.25).
- ``cfg_forward_14b``: a random 14B-shape bidirectional Wan in bf16 on the GPU, one no-grad forward at batch 2
  (cond + negative, as the CFG teacher runs) on latent 16x21x60x104 with context ``[2, 512, 4096]`` under bf16
  autocast. Reports seconds, weights and peak memory, the measured transient (peak - weights), and the plan's
  predicted numbers (``salt_ref.memory_plan.plan`` of ``--scale full --dry-run --gpus 8``) for comparison. An OOM is
  a result: the section is then ``ok: false`` with the OOM message.

How long: estimated at 2-3 minutes on one H100/H200 from the FLOP and byte counts (model builds and warm-ups
included; the largest parts are the 14B build and forward, ~20 s, and the torchrun start-up), under 8 in any
case; the ``train_tiny`` subprocess is capped at 5 minutes. ``--tiny`` runs every section at tiny sizes
(``WanConfig.preset("tiny")``, latent 3x4x8x8, context ``[b, 8, 32]``) on whatever device exists, the CPU
included, in about 40 s on a 2-core CPU: the test suite's proof that this script runs, not a measurement.

How to read the JSON (written after every section, so a hard crash still leaves the sections before it; also
printed to stdout at the end)::

    {"mode": "full" | "tiny", "device": "cuda" | "cpu", "ok": <every section ok>, "seconds": <total>,
     "command": "...", "sections_planned": ["env", ...], "sections": {
        "env":             {"ok", "seconds", "torch", "cuda", "gpu", "gpu_memory_gib", ...},
        "train_tiny":      {"ok", "seconds", "backend", "returncode", "iterations", "losses": [{...} per iter],
                            "loss_align_seen", "final": <the run's last stdout JSON line>, "wall_seconds",
                            "nccl_log_lines" (CUDA), "stdout_tail"/"stderr_tail" (on failure), ...},
        "generate_1p3b":   {"ok", "seconds", "sdpa": {"probe", "probe_first_ok", "ran", "model_ops"},
                            "full_memory": {"chunk_seconds", "total_seconds", "latent_fps", "video_fps",
                                            "peak_memory_gib", ...},
                            "sink_window_relative": {"chunk_seconds", "steady_chunk_seconds", "steady_ratio",
                                                     "flat", ...}},
        "cfg_forward_14b": {"ok", "seconds", "forward_seconds", "weights_gib", "expected_weights_gib",
                            "peak_memory_gib", "measured_transient_gib", "plan_teacher_transient_gib",
                            "measured_over_plan", "plan_lines": [...]}}}

Every section has ``ok``, ``seconds`` and, when it failed, ``error`` (the exception text) and ``traceback``; the
fields measured before a failure are kept. Memory is in GiB (``torch.cuda.max_memory_allocated``; ``null`` on
the CPU). Per-chunk seconds are device-synchronised at every chunk boundary. Exit code 0 when every section is
ok, 1 otherwise, 2 on bad flags or (without ``--tiny``) without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout: the package sits next to scripts/
    sys.path.insert(0, str(REPO))

from salt_ref.generate import generate  # noqa: E402
from salt_ref.kv_cache import MemoryPolicy  # noqa: E402
from salt_ref.models.wan import WanConfig, WanModel  # noqa: E402
from salt_ref.recipe import PRESETS  # noqa: E402

SECTIONS = ("train_tiny", "generate_1p3b", "cfg_forward_14b")
TRAIN_TIMEOUT_S = 300
FLAT_RATIO = 1.25  # steady per-chunk seconds count as flat when max / min stays under this
GIB = 2**30


def video_frames(latent_frames: int) -> int:
    """Pixel frames the Wan VAE decodes from ``latent_frames`` (temporal stride 4, first frame alone)."""
    return 4 * (latent_frames - 1) + 1


# ------------------------------------------------------------------------------------------- helpers


class Context:
    """Where and at which sizes the sections run."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / GIB, 3) if self.cuda else None

    def allocated_gib(self) -> float | None:
        return round(torch.cuda.memory_allocated(self.device) / GIB, 3) if self.cuda else None

    def free(self) -> None:
        """Release what the last section left: garbage, the allocator's cache, the peak counter."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def run_section(name: str, fn: Callable[[dict, Context], None], ctx: Context) -> dict:
    """``fn(record, ctx)`` fills ``record`` as it measures; an exception is recorded, never raised."""
    ctx.free()
    record: dict = {"ok": False, "seconds": None}
    t0 = time.perf_counter()
    try:
        fn(record, ctx)
        record["ok"] = True
    except Exception as e:  # a failing section must not stop the others: OOM, CUDA errors, bad output, ...
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = "".join(traceback.format_exception(e))[-4000:]
        traceback.clear_frames(e.__traceback__)  # the frames hold the section's tensors: let them go
    record["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.free()
    return record


def random_model(cfg: WanConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> WanModel:
    """A ``WanModel`` with torch's default random init, allocated directly on ``device`` in ``dtype``.

    Built under a default dtype of ``dtype`` so a 14B model never holds an fp32 copy (57 GB) on the way.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


# ------------------------------------------------------------------------------------------- sections


def section_env(rec: dict, ctx: Context) -> None:
    rec.update(
        torch=torch.__version__,
        python=sys.version.split()[0],
        cuda_available=torch.cuda.is_available(),
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nccl=_nccl_version() if ctx.cuda else None,
        device=str(ctx.device),
        gpu=None,
        gpu_memory_gib=None,
        gpu_count=torch.cuda.device_count() if ctx.cuda else 0,
        cpu_threads=torch.get_num_threads(),
    )
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        rec.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GIB, 2),
            compute_capability=f"{props.major}.{props.minor}",
        )


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a CUDA build without NCCL: the env section still reports the rest
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _write_tiny_checkpoints(root: Path) -> None:
    """Random tiny student/critic/teacher checkpoints and a prompt file (the stand-ins of ``tests/tiny_wan.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_wan import write_run_inputs

    write_run_inputs(root)


def train_command(root: Path, out: Path) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [
        *launch, "-m", "salt_ref.train",
        "--scale", "full", "--model", "tiny", "--teacher-model", "tiny",
        "--student", str(root / "student.safetensors"), "--critic", str(root / "critic.safetensors"),
        "--teacher", str(root / "teacher.safetensors"), "--prompts", str(root / "prompts.safetensors"),
        "--latent", "3x4x8x8", "--chunk-frames", "2", "--align-block", "2", "--align-start", "0",
        "--memory", "window:2", "--total-batch", "2", "--critic-ratio", "1", "--ckpt-every", "1",
        "--activation-checkpointing", "--mixed-precision", "--no-progress", "--iters", "3", "--out", str(out),
    ]  # fmt: skip


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def section_train_tiny(rec: dict, ctx: Context) -> None:
    rec["backend"] = "nccl" if ctx.cuda else "gloo"  # what salt_ref.full.start picks, by torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_train_") as tmp:
        root = Path(tmp)
        _write_tiny_checkpoints(root)
        out = root / "run"
        cmd = train_command(root, out)
        rec["command"] = shlex.join(cmd[1:]).replace(tmp, "$TMP")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", "1")
        if ctx.cuda and "NCCL_DEBUG" not in env:  # NCCL's own log proves its communicator came up (and its version)
            env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_FILE=str(root / "nccl.%h.%p.log"))  # off stdout: the JSON line
        t0 = time.perf_counter()
        run = _run_group(cmd, env, TRAIN_TIMEOUT_S)
        rec["wall_seconds"] = round(time.perf_counter() - t0, 3)
        rec["returncode"] = run.returncode
        rows = []
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rec["iterations"] = len(rows)
        rec["losses"] = [_loss_row(r) for r in rows]
        rec["loss_align_seen"] = any("loss_align" in r for r in rows)
        rec["final"] = _last_json_line(run.stdout)
        if ctx.cuda:
            logs = [run.stdout, run.stderr, *(f.read_text(errors="replace") for f in root.glob("nccl.*.log"))]
            nccl = [x for text in logs for x in text.splitlines() if "NCCL INFO" in x]
            rec["nccl_log_lines"] = len(nccl)
            rec["nccl_version_line"] = next((x.strip()[-200:] for x in nccl if "NCCL version" in x), None)
        if run.returncode != 0 or rec["final"] is None:
            rec["stdout_tail"] = run.stdout[-3000:]
            rec["stderr_tail"] = run.stderr[-3000:]
            raise RuntimeError(f"torchrun exited {run.returncode}; last stderr line: {_last_line(run.stderr)}")
    finite = all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))
    if rec["iterations"] != 3 or not rec["loss_align_seen"] or not finite:
        raise RuntimeError(
            f"expected 3 finite iterations with loss_align: got {rec['iterations']} iterations, "
            f"loss_align {'seen' if rec['loss_align_seen'] else 'missing'}, losses {'' if finite else 'not '}finite"
        )


def _run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in its own process group: on a timeout torchrun *and its workers* are killed (a worker
    orphaned by killing torchrun alone would keep its GPU memory while the next sections run)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise RuntimeError(
            f"torchrun did not finish in {timeout:.0f} s (killed); last stderr line: {_last_line(stderr)}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _loss_row(row: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items() if k == "iter" or "loss" in k}


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "(empty)"


_SDPA_KERNELS = (  # aten op name fragment -> backend, most specific first
    ("flash_attention", "FLASH_ATTENTION"),
    ("efficient_attention", "EFFICIENT_ATTENTION"),
    ("cudnn_attention", "CUDNN_ATTENTION"),
    ("attention_math", "MATH"),
    ("overrideable", "OVERRIDEABLE"),
)


def _sdpa_backends(op_names: Counter) -> list[str]:
    """The SDPA backends whose aten kernels appear among ``op_names`` (most often one)."""
    return [backend for fragment, backend in _SDPA_KERNELS if any(fragment in name for name in op_names)]


def sdpa_probe(ctx: Context, heads: int, head_dim: int, q_tokens: int, k_tokens: int) -> dict:
    """Which SDPA backends accept the model's bf16 self-attention layout (``[B, L, H, hd]`` transposed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(ctx.device).manual_seed(0)
    q = torch.randn(1, q_tokens, heads, head_dim, device=ctx.device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, k_tokens, heads, head_dim, device=ctx.device, dtype=torch.bfloat16, generator=g)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    probe = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            probe[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k)
            ctx.sync()
            probe[name] = "ok"
        except RuntimeError as e:
            probe[name] = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    first = next((n for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH") if probe[n] == "ok"), None)
    return {"shape_q": [1, heads, q_tokens, head_dim], "shape_k": [1, heads, k_tokens, head_dim], "probe": probe,
            "probe_first_ok": first}  # fmt: skip


def _sdpa_ops(prof) -> Counter:
    return Counter({e.key: e.count for e in prof.key_averages() if "scaled_dot_product" in e.key})


def _timed_generate(ctx: Context, model: WanModel, context: torch.Tensor, frames: int, size, memory, rope) -> dict:
    ctx.free()
    with torch.autocast(ctx.device.type, torch.bfloat16):  # chunked_rollout syncs CUDA before timing a chunk
        ctx.sync()
        t0 = time.perf_counter()
        video, chunk_seconds = generate(
            model,
            context,
            frames=frames,
            size=size,
            recipe=PRESETS["wan"],
            memory=memory,
            rope=rope,
            return_times=True,
        )
        ctx.sync()
        total = time.perf_counter() - t0
    result = {
        "memory": str(memory),
        "rope": rope,
        "latent": [model.config.in_dim, frames, *size],
        "latent_frames": frames,
        "video_frames": video_frames(frames),
        "chunks": len(chunk_seconds),
        "chunk_seconds": _rounded(chunk_seconds),
        "total_seconds": round(total, 4),
        "latent_fps": round(frames / total, 3),
        "video_fps": round(video_frames(frames) / total, 3),
        "peak_memory_gib": ctx.peak_gib(),
        "output_finite": bool(torch.isfinite(video).all()),
    }
    del video
    return result


def section_generate(rec: dict, ctx: Context) -> None:
    if ctx.tiny:
        cfg = WanConfig.preset("tiny", causal=True)  # chunks of 2 frames
        frames, size, text = 4, (8, 8), (1, 8, 32)
        long_frames, long_memory = 12, "sink:1+window:4"
    else:
        cfg = WanConfig.preset("1.3B", causal=True, chunk_frames=3)
        frames, size, text = 21, (60, 104), (1, 512, 4096)
        long_frames, long_memory = 42, "sink:3+window:12"
    rec["model"] = "tiny" if ctx.tiny else "1.3B"
    t0 = time.perf_counter()
    model = random_model(cfg, ctx.device)
    ctx.sync()
    rec["build_seconds"] = round(time.perf_counter() - t0, 3)
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    rec["weights_gib"] = ctx.allocated_gib()
    g = torch.Generator(ctx.device).manual_seed(0)
    context = torch.randn(*text, device=ctx.device, dtype=torch.bfloat16, generator=g)
    tpf = (size[0] // 2) * (size[1] // 2)
    chunk_tokens = cfg.chunk_frames * tpf
    rec["sdpa"] = sdpa_probe(ctx, cfg.num_heads, cfg.head_dim, chunk_tokens, 2 * chunk_tokens)

    # warm-up (untimed for the results): two chunks, so the second attends through the cache; the profiler
    # records which SDPA kernel the model's own attention dispatched to
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast(ctx.device.type, torch.bfloat16):
        generate(model, context, frames=2 * cfg.chunk_frames, size=size, recipe=PRESETS["wan"], steps=1)
        ctx.sync()
    rec["warmup_seconds"] = round(time.perf_counter() - t0, 3)
    ops = _sdpa_ops(prof)
    del prof
    rec["sdpa"]["model_ops"] = dict(ops)
    rec["sdpa"]["ran"] = _sdpa_backends(ops)

    rec["full_memory"] = _timed_generate(ctx, model, context, frames, size, MemoryPolicy.parse("full"), "absolute")
    rec["full_memory"]["steps"] = PRESETS["wan"].sample_steps

    policy = MemoryPolicy.parse(long_memory)
    long = _timed_generate(ctx, model, context, long_frames, size, policy, "relative")
    n_fill = -(-(policy.sink + policy.window) // cfg.chunk_frames)  # chunks until the cache is full
    steady = long["chunk_seconds"][n_fill:] or long["chunk_seconds"][-1:]
    long["trained_latent_frames"] = frames
    long["steady_from_chunk"] = n_fill
    long["steady_chunk_seconds"] = steady
    long["steady_ratio"] = round(max(steady) / max(min(steady), 1e-9), 3)
    long["flat"] = long["steady_ratio"] <= FLAT_RATIO
    rec["sink_window_relative"] = long


def _plan_numbers() -> dict:
    from salt_ref.memory_plan import plan
    from salt_ref.train import build_parser

    args = build_parser("full").parse_args(["--scale", "full", "--dry-run", "--gpus", "8"])
    text = plan(args, 8)
    keep = ("| teacher |", "teacher CFG forward", "estimated peak per GPU", "latent ")
    lines = [line for line in text.splitlines() if line.startswith(keep)]
    transient = None
    for line in lines:
        if line.startswith("teacher CFG forward"):
            m = re.findall(r"~\s*([\d,.]+)\s*GiB", line) or re.findall(r"([\d,.]+)\s*GiB", line)
            transient = float(m[-1].replace(",", "")) if m else None
    return {"plan_gpus": 8, "plan_lines": lines, "plan_teacher_transient_gib": transient}


def section_cfg_forward(rec: dict, ctx: Context) -> None:
    rec.update(_plan_numbers())  # first: the prediction is reported even if the build runs out of memory
    if ctx.tiny:
        cfg = WanConfig.preset("tiny")
        latent, text = (3, 4, 8, 8), (2, 8, 32)
    else:
        cfg = WanConfig.preset("14B")
        latent, text = (16, 21, 60, 104), (2, 512, 4096)
    rec["model"] = "tiny" if ctx.tiny else "14B"
    rec["latent"], rec["batch"] = list(latent), 2
    t0 = time.perf_counter()
    model = random_model(cfg, ctx.device)
    ctx.sync()
    rec["build_seconds"] = round(time.perf_counter() - t0, 3)
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    weights = ctx.allocated_gib()
    rec["weights_gib"] = weights
    rec["expected_weights_gib"] = round(2 * rec["parameters"] / GIB, 3)  # bf16, unsharded (world 1)
    g = torch.Generator(ctx.device).manual_seed(0)
    x = torch.randn(2, *latent, device=ctx.device, dtype=torch.bfloat16, generator=g)
    context = torch.randn(*text, device=ctx.device, dtype=torch.bfloat16, generator=g)
    t = torch.full((2,), 500.0, device=ctx.device)
    with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16):
        model(x[:, :, :1], t, context)  # warm-up on one latent frame: kernels, handles, RoPE tables
        ctx.sync()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        out = model(x, t, context)
        ctx.sync()
        rec["forward_seconds"] = round(time.perf_counter() - t0, 4)
    rec["peak_memory_gib"] = ctx.peak_gib()
    rec["measured_transient_gib"] = None if weights is None else round(rec["peak_memory_gib"] - weights, 3)
    if rec["measured_transient_gib"] is not None and rec["plan_teacher_transient_gib"]:
        rec["measured_over_plan"] = round(rec["measured_transient_gib"] / rec["plan_teacher_transient_gib"], 3)
    rec["output_shape"] = list(out.shape)
    rec["output_finite"] = bool(torch.isfinite(out).all())


RUNNERS = {"train_tiny": section_train_tiny, "generate_1p3b": section_generate, "cfg_forward_14b": section_cfg_forward}


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/gpu_smoke.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_smoke.json", help="where the JSON report goes (default: %(default)s)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (env always runs)",
    )
    p.add_argument("--tiny", action="store_true", help="every section at tiny sizes on any device, the CPU included")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        print(f"error: unknown section(s) {unknown or wanted}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not args.tiny and not torch.cuda.is_available():
        print(
            "error: gpu_smoke.py needs a CUDA GPU (one H100/H200); use --tiny for the tiny sizes on this machine",
            file=sys.stderr,
        )
        return 2
    ctx = Context(tiny=args.tiny)
    planned = ["env", *[s for s in SECTIONS if s in wanted]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": "tiny" if args.tiny else "full",
        "device": ctx.device.type,
        "ok": False,
        "seconds": None,
        "command": shlex.join([sys.executable, *sys.argv]),
        "sections_planned": planned,
        "sections": {},
    }
    t0 = time.perf_counter()
    for name in planned:
        print(f"[gpu_smoke] {name} ...", file=sys.stderr, flush=True)
        rec = run_section(name, section_env if name == "env" else RUNNERS[name], ctx)
        report["sections"][name] = rec
        status = "ok" if rec["ok"] else f"FAILED: {rec['error'].splitlines()[0][:200]}"
        print(f"[gpu_smoke] {name}: {status} ({rec['seconds']:.1f} s)", file=sys.stderr, flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        done = report["sections"].values()
        report["ok"] = len(done) == len(planned) and all(r["ok"] for r in done)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every section: a crash keeps the rest
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

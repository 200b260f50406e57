r"""The small video setup: Salt in miniature on the procedural video world, a tiny Wan at every role.

Pipeline (each stage through the shared loop, each cached on disk and reused when present)::

    teacher  bidirectional tiny WanModel, flow matching on world clips with CFG dropout     (salt_ref.pretrain)
    init     causal tiny WanModel regressed on the teacher's CFG ODE trajectories (ODE init)
    distil   self-forcing | sc-dmd | salt over chunk-wise rollouts through the KV cache  (salt_ref.video_task)

The class label stands in for the prompt: its embedding (``toy.video_world.class_embedding``) is the text state
``[B, L, D]`` and ``null_embedding`` is the unconditional branch of CFG. Clips are ``[B, 3, F, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from salt_ref import checkpoint as ckpt
from salt_ref.loop import LoopConfig, loop_fingerprint, train
from salt_ref.models.wan import WanConfig, WanModel
from salt_ref.pretrain import FlowMatchingTask, ODERegressionTask, teacher_trajectories
from salt_ref.schedule import denoising_sigmas
from salt_ref.video_task import VideoDistillTask, VideoTaskConfig
from toy import video_world as vw

__all__ = [
    "SmallVideoConfig",
    "ClassPrompts",
    "model_config",
    "get_teacher",
    "get_student_init",
    "build_task",
    "distill_loop",
    "run",
    "load_run",
    "evaluate_student",
    "cache_quality_gap",
]


@dataclass
class SmallVideoConfig:
    """The small-scale recipe: world, model size, and the budgets of the three stages."""

    method: str = "salt"
    memory: str = "full"
    rope: str = "absolute"
    frames: int = 8
    size: int = 16
    chunk_frames: int = 2
    patch: int = 4
    dim: int = 128
    layers: int = 4
    heads: int = 4
    teacher_iters: int = 2000
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    ode_pairs: int = 64
    ode_iters: int = 300
    cfg_scale: float = 2.0
    align_start: int = 0
    align_block: int = 2
    seed: int = 0
    world: dict = field(default_factory=dict)

    def world_config(self) -> vw.VideoWorldConfig:
        return vw.VideoWorldConfig(frames=self.frames, size=self.size, **self.world)

    def teacher_key(self) -> str:
        keys = (
            "frames",
            "size",
            "patch",
            "dim",
            "layers",
            "heads",
            "teacher_iters",
            "teacher_batch",
            "teacher_lr",
            "world",
        )
        blob = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def init_key(self) -> str:
        keys = ("chunk_frames", "ode_pairs", "ode_iters", "cfg_scale")
        blob = json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True)
        return self.teacher_key() + "-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


def model_config(cfg: SmallVideoConfig, *, causal: bool) -> WanConfig:
    """The tiny Wan of every role (the ``tiny`` preset resized by ``cfg``)."""
    return WanConfig.preset(
        "tiny",
        dim=cfg.dim,
        ffn_dim=4 * cfg.dim,
        num_heads=cfg.heads,
        num_layers=cfg.layers,
        patch_size=(1, cfg.patch, cfg.patch),
        causal=causal,
        chunk_frames=cfg.chunk_frames,
    )


class ClassPrompts:
    """``PromptSource`` of the video world: class-label embeddings, and the null embedding for CFG."""

    def __init__(self, world: vw.VideoWorldConfig, text_len: int, text_dim: int):
        self.world, self.text_len, self.text_dim = world, text_len, text_dim

    def embed(self, labels: Tensor) -> Tensor:
        return vw.class_embedding(labels, self.text_dim, self.text_len)

    def null(self, batch: int) -> Tensor:
        return vw.null_embedding(self.text_dim, self.text_len)[None].expand(batch, -1, -1)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(self.world.n_classes, (batch,), generator=generator)
        return self.embed(labels), self.null(batch)


def _load_module(path: Path, model: torch.nn.Module, prefix: str = "ema") -> torch.nn.Module:
    tensors, _ = ckpt.load_state(path)
    ckpt.load_module_tensors(prefix, model, tensors)
    return model


def get_teacher(cfg: SmallVideoConfig, cache_dir: Path, *, progress: bool = True) -> WanModel:
    """The flow-matching teacher (EMA weights), trained once and cached under ``cache_dir``."""
    world = cfg.world_config()
    mcfg = model_config(cfg, causal=False)
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    run_dir = cache_dir / f"teacher-{cfg.teacher_key()}"
    torch.manual_seed(0)  # the cache key holds no seed: every run's teacher must be the same network
    model = WanModel(mcfg)
    done = run_dir / "checkpoint.safetensors"
    if not (done.exists() and ckpt.read_header(done)["iteration"] >= cfg.teacher_iters):

        def batch_fn(g: torch.Generator):
            video, labels, _ = vw.sample(cfg.teacher_batch, g, config=world)
            return video, prompts.embed(labels), prompts.null(cfg.teacher_batch)

        loop = LoopConfig(
            iters=cfg.teacher_iters,
            critic_ratio=0,
            lr_gen=cfg.teacher_lr,
            betas=(0.9, 0.99),
            weight_decay=0.0,
            grad_clip=1.0,
            ema_decay=0.995,
            ema_start=100,
            ckpt_every=100,
            log_every=10,
            seed=0,
        )
        train(FlowMatchingTask(model, batch_fn), loop, run_dir, resume=done.exists(), progress=progress)
    return _load_module(done, WanModel(mcfg)).requires_grad_(False)


def get_student_init(cfg: SmallVideoConfig, teacher: WanModel, cache_dir: Path, *, progress: bool = True) -> WanModel:
    """The causal student after ODE regression on the teacher's CFG trajectories (cached)."""
    mcfg = model_config(cfg, causal=True)
    run_dir = cache_dir / f"init-{cfg.init_key()}"
    done = run_dir / "checkpoint.safetensors"
    if not (done.exists() and ckpt.read_header(done)["iteration"] >= cfg.ode_iters):
        world = cfg.world_config()
        prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
        g = torch.Generator().manual_seed(1)
        labels = torch.arange(cfg.ode_pairs) % world.n_classes
        noise = torch.randn(cfg.ode_pairs, mcfg.in_dim, cfg.frames, cfg.size, cfg.size, generator=g)
        pairs = teacher_trajectories(
            teacher,
            noise,
            prompts.embed(labels),
            prompts.null(cfg.ode_pairs),
            denoising_sigmas(16, 5.0),
            denoising_sigmas(8, 5.0),
            cfg_scale=cfg.cfg_scale,
        )
        student = WanModel(mcfg)
        student.load_state_dict({k: v for k, v in teacher.state_dict().items()})  # same weights, causal mask
        loop = LoopConfig(
            iters=cfg.ode_iters,
            critic_ratio=0,
            lr_gen=1e-4,
            betas=(0.9, 0.99),
            weight_decay=0.0,
            grad_clip=1.0,
            ema_start=10**9,
            ckpt_every=100,
            log_every=10,
            seed=0,
        )
        task = ODERegressionTask(student.requires_grad_(True), pairs, batch=8, chunk_frames=cfg.chunk_frames)
        train(task, loop, run_dir, resume=done.exists(), progress=progress)
    return _load_module(done, WanModel(mcfg), prefix="generator")


def build_task(cfg: SmallVideoConfig, teacher: WanModel, init: WanModel) -> VideoDistillTask:
    """Student from the ODE init, critic and teacher from the flow-matching teacher."""
    world = cfg.world_config()
    mcfg = model_config(cfg, causal=True)
    task_cfg = VideoTaskConfig(
        method=cfg.method,
        latent=(mcfg.in_dim, cfg.frames, cfg.size, cfg.size),
        chunk_frames=cfg.chunk_frames,
        memory=cfg.memory,
        rope=cfg.rope,
        cfg_scale=cfg.cfg_scale,
        align_start=cfg.align_start,
        align_block=cfg.align_block,
        batch=4,
    )
    critic = copy.deepcopy(teacher).requires_grad_(True)
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    return VideoDistillTask(task_cfg, copy.deepcopy(init).requires_grad_(True), critic, teacher, prompts)


def distill_loop(
    iters: int,
    seed: int = 0,
    *,
    lr_gen: float = 1e-4,
    lr_critic: float = 2e-4,
    critic_ratio: int = 5,
    ckpt_every: int = 25,
) -> LoopConfig:
    """The loop settings of the small-scale distillation (shared by the CLI, the benchmark and the tutorial)."""
    return LoopConfig(
        iters=iters,
        critic_ratio=critic_ratio,
        lr_gen=lr_gen,
        lr_critic=lr_critic,
        ema_start=min(50, iters // 4),
        ckpt_every=ckpt_every,
        log_every=1,
        seed=seed,
    )


CACHE_DIR = Path("runs/cache")
HORIZONS = (1, 2, 4)


def evaluate_student(
    student: WanModel,
    cfg: SmallVideoConfig,
    *,
    n_per_class: int = 4,
    memory: str | None = None,
    rope: str | None = None,
    horizons: tuple[int, ...] = HORIZONS,
    steps: int = 4,
    seed: int = 1234,
) -> tuple[dict[str, dict[str, float]], dict[int, Tensor], Tensor]:
    """Metrics at each horizon (x the trained length), the videos, and the drift curve of the longest."""
    from salt_ref.sample import generate
    from toy import video_metrics as vm

    world = cfg.world_config()
    mcfg = student.config
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    labels = torch.arange(world.n_classes).repeat_interleave(n_per_class)
    results, videos = {}, {}
    for h in horizons:
        frames = h * cfg.frames
        g = torch.Generator().manual_seed(seed)
        video = generate(
            student,
            prompts.embed(labels),
            frames=frames,
            size=(cfg.size, cfg.size),
            steps=steps,
            memory=memory or cfg.memory,
            rope=rope or cfg.rope,
            generator=g,
        )
        ref, _, _ = vw.sample(
            len(labels), torch.Generator().manual_seed(seed + 1), config=world, frames=frames, label=labels
        )
        results[f"{h}x"] = vm.evaluate_video(video, labels, ref, config=world)
        videos[h] = video
    return results, videos, vm.drift_curve(videos[max(horizons)])


def run(
    cfg: SmallVideoConfig,
    loop_cfg: LoopConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    cache_dir: Path = CACHE_DIR,
) -> dict:
    """Teacher and init (cached), distillation through the loop, then metrics, videos and plots."""
    from salt_ref.plots import plot_losses

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = get_teacher(cfg, cache_dir, progress=progress)
    init = get_student_init(cfg, teacher, cache_dir, progress=progress)
    task = build_task(cfg, teacher, init)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    fingerprint = {"small": asdict(cfg), "loop": loop_fingerprint(loop_cfg)}
    result = train(task, loop_cfg, out_dir, fingerprint=fingerprint, resume=resume, progress=progress)
    metrics, videos, drift = evaluate_student(result.ema.eval(), cfg)
    final = {
        "iterations": result.iterations,
        "method": cfg.method,
        "memory": cfg.memory,
        "metrics": metrics,
        "drift": drift.tolist(),
    }
    (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
    for h, video in videos.items():
        vw.save_video(video, out_dir / f"samples_{h}x.gif")
    if result.iterations > 0:  # --iters 0 evaluates the ODE init: there is no loss to plot
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    _plot_drift(drift, cfg.frames, out_dir / "drift.png")
    return final


def _plot_drift(drift: Tensor, trained: int, out_png: Path) -> None:
    from salt_ref.plots import plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(drift)), drift.numpy(), marker=".")
    ax.axvline(trained - 0.5, ls="--", c="gray", label="trained length")
    ax.set_xlabel("frame")
    ax.set_ylabel("fidelity (re-render MSE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def load_run(run_dir: Path) -> tuple[WanModel, SmallVideoConfig, ClassPrompts]:
    """The EMA student of a small-scale run, its config and its prompts (for ``python -m salt_ref.sample``)."""
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.safetensors"
    for path in (cfg_path, ckpt_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: is {run_dir} a small-scale run directory?")
    cfg = SmallVideoConfig(**json.loads(cfg_path.read_text()))
    mcfg = model_config(cfg, causal=True)
    model = _load_module(ckpt_path, WanModel(mcfg)).eval()
    return model, cfg, ClassPrompts(cfg.world_config(), mcfg.text_len, mcfg.text_dim)


@torch.no_grad()
def cache_quality_gap(
    student: WanModel,
    cfg: SmallVideoConfig,
    *,
    n_per_class: int = 4,
    frames: int | None = None,
    memory: str | None = None,
    hq_steps: int = 4,
    seed: int = 4321,
) -> dict[str, float]:
    """Quality of 2-step chunks conditioned on an LQ cache (written by 2-step outputs) vs an HQ cache (written by
    4-step outputs of the same student, same noise): metrics of both videos and their fidelity gap (LQ - HQ).

    The gap is taken on per-frame fidelity only: the HQ path shows its 2-step chunks but continues from the 4-step
    ones in its cache, so motion across its chunk boundaries (and the Fréchet distance built on it) measures that
    splice, not the cache's effect. ``frames`` defaults to the trained length; longer rollouts accumulate the
    cache's effect over more chunks.
    """
    from salt_ref.updates import rollout
    from toy import video_metrics as vm

    world = cfg.world_config()
    mcfg = student.config
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    labels = torch.arange(world.n_classes).repeat_interleave(n_per_class)
    ctx = prompts.embed(labels)
    frames = frames or cfg.frames
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), mcfg.in_dim, frames, cfg.size, cfg.size, generator=g)
    two, hq_grid = denoising_sigmas(2, 5.0), denoising_sigmas(hq_steps, 5.0)
    caches = {
        q: student.new_cache(
            memory or cfg.memory, batch=len(labels), frames_hw=(cfg.size, cfg.size), max_frames=frames, rope=cfg.rope
        )
        for q in ("lq", "hq")
    }
    outs: dict[str, list[Tensor]] = {"lq": [], "hq": []}
    for s in range(0, frames, cfg.chunk_frames):
        e = min(s + cfg.chunk_frames, frames)

        def flow(q: str, s: int = s):
            return lambda x, sig: student(x, sig * 1000.0, ctx, kv_cache=caches[q], start_frame=s)

        chunk = noise[:, :, s:e]
        draws = g.get_state()  # every rollout of the chunk re-noises with the same draws: only caches differ
        x_hq4 = rollout(flow("hq"), chunk, hq_grid, generator=g, grad_exit=False).x0
        for q in ("lq", "hq"):
            g.set_state(draws)
            outs[q].append(rollout(flow(q), chunk, two, generator=g, grad_exit=False).x0)
        zero = torch.zeros(len(labels))
        student(outs["lq"][-1], zero, ctx, kv_cache=caches["lq"], start_frame=s, commit=True)
        student(x_hq4, zero, ctx, kv_cache=caches["hq"], start_frame=s, commit=True)
    ref, _, _ = vw.sample(
        len(labels), torch.Generator().manual_seed(seed + 1), config=world, frames=frames, label=labels
    )
    res = {}
    for q in ("lq", "hq"):
        for k, v in vm.evaluate_video(torch.cat(outs[q], dim=2), labels, ref, config=world).items():
            res[f"{q}_{k}"] = v
    res["gap_fidelity"] = res["lq_fidelity"] - res["hq_fidelity"]
    return res

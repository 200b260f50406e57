r"""A small-scale run on the video world: train through the setup, evaluate, write its files; read a run back.

``run`` trains the distillation of ``toy.setup_video`` through the shared loop and evaluates the EMA student at
1x, 2x and 4x the trained length (``toy.video_metrics``: per-frame fidelity, motion, class accuracy, diversity, a
Fréchet distance on physics features, the drift curve), writing ``config.json``, ``final_metrics.json`` (with the
recipe), GIFs, ``loss.png`` and ``drift.png``. ``cache_quality_gap`` is the LQ/HQ cache experiment: chunks of the
LQ list (2 steps) under a cache written by their own outputs vs by 4-step outputs of the same chunks::

    gap_fidelity   = fidelity(video | LQ cache) - fidelity(video | HQ cache)
    gap_appearance = appearance(video | LQ cache) - appearance(video | HQ cache)

``appearance`` is how far later chunks stray from the per-clip tint of the first chunk in the cache
(``toy.video_metrics.appearance_error``): in the tinted world only the cache carries it.

Videos ``[B, 3, F, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from salt_ref.cache_condition import chunked_rollout
from salt_ref.generate import generate
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import LoopConfig, train
from salt_ref.models.causal_flow import WanCausalFlow
from salt_ref.models.wan import WanModel
from salt_ref.updates import rollout
from toy import video_metrics as vm
from toy import video_world as vw
from toy.setup_video import (
    CACHE_DIR,
    ClassPrompts,
    SmallVideoConfig,
    build_task,
    get_student_init,
    get_teacher,
    load_module,
    model_config,
)

__all__ = [
    "HORIZONS",
    "EVAL_SEED",
    "reference_clips",
    "evaluate_student",
    "run",
    "load_run",
    "cache_quality_gap",
    "alignment_probe",
]

HORIZONS = (1, 2, 4)
EVAL_SEED = 1234  # evaluate_student's noise; its world reference clips are drawn from EVAL_SEED + 1


def reference_clips(cfg: SmallVideoConfig, labels: Tensor, frames: int, seed: int = EVAL_SEED) -> Tensor:
    """The world's clips ``[N, 3, frames, S, S]`` an evaluation with noise seed ``seed`` measures against."""
    ref, _, _ = vw.sample(
        len(labels), torch.Generator().manual_seed(seed + 1), config=cfg.world_config(), frames=frames, label=labels
    )
    return ref


def evaluate_student(
    student: WanModel,
    cfg: SmallVideoConfig,
    *,
    n_per_class: int = 4,
    memory: MemoryPolicy | None = None,
    rope: str | None = None,
    horizons: tuple[int, ...] = HORIZONS,
    steps: int | None = None,
    seed: int = EVAL_SEED,
) -> tuple[dict[str, dict[str, float]], dict[int, Tensor], Tensor]:
    """Metrics at each horizon (x the trained length), the videos, and the drift curve of the longest.

    Sampling follows ``cfg.recipe`` (``steps`` defaults to its ``sample_steps``), under ``memory`` and ``rope``
    (default: the run's). Each horizon's metrics also hold the world's own ``physics_stats`` (``world_speed``,
    ``world_radius``, ``world_bounces``, ``world_stuck``) of the reference clips.
    """
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
            recipe=cfg.recipe,
            steps=steps,
            memory=memory or cfg.memory,
            rope=rope or cfg.rope,
            generator=g,
        )
        ref = reference_clips(cfg, labels, frames, seed)
        res = vm.evaluate_video(video, labels, ref, config=world, chunk_frames=cfg.chunk_frames)
        # the world's own look, measured the same way on its clips: the students' speed/radius/bounces sit next to it
        res.update({f"world_{k}": v for k, v in vm.physics_stats(ref, config=world).items()})
        results[f"{h}x"] = res
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
    if not resume:  # a resume keeps the run's own (a refused one, with other settings, must not change it)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    result = train(
        task,
        loop_cfg,
        out_dir,
        fingerprint={"small": cfg.to_dict()},
        resume=resume,
        progress=progress,
        desc=f"3/3 distill ({cfg.method})",
    )
    metrics, videos, drift = evaluate_student(result.ema.eval(), cfg)
    final = {
        "iterations": result.iterations,
        "method": cfg.method,
        "memory": str(cfg.memory),
        "metrics": metrics,
        "drift": drift.tolist(),
        "recipe": cfg.recipe.to_dict(),
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
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    cfg = SmallVideoConfig.from_dict(data, source=str(cfg_path))
    mcfg = model_config(cfg, causal=True)
    model = load_module(ckpt_path, WanModel(mcfg)).eval()
    return model, cfg, ClassPrompts(cfg.world_config(), mcfg.text_len, mcfg.text_dim)


@torch.no_grad()
def cache_quality_gap(
    student: WanModel,
    cfg: SmallVideoConfig,
    *,
    n_per_class: int = 4,
    frames: int | None = None,
    memory: MemoryPolicy | None = None,
    rope: str | None = None,
    seed: int = 4321,
) -> dict[str, float]:
    """Quality of LQ-list chunks (the recipe's ``align_steps``, 2) under an LQ cache written by their own outputs,
    vs under an HQ cache written by ``align_reference_steps`` (4) outputs of the same student and chunk noise:
    metrics of both videos and their fidelity gap (LQ - HQ).

    Both are one :func:`~salt_ref.cache_condition.chunked_rollout` along the LQ list; the HQ one's ``writer``
    rolls the chunk out again on the HQ grid, replaying the chunk's draws, and writes that (so the two videos
    differ only by their caches; with an HQ grid equal to the LQ list they are identical). The gap is taken on
    per-frame fidelity only: the HQ path shows its 2-step chunks but continues from the 4-step ones in its cache,
    so motion across its chunk boundaries (and the Fréchet distance built on it) measures that splice, not the
    cache's effect. ``frames`` defaults to the trained length; longer rollouts
    accumulate the cache's effect over more chunks.

    ``{lq,hq}_appearance`` is :func:`toy.video_metrics.appearance_error` of the shown chunks after the first
    against the first chunk *as written into that path's cache* (the 2-step output for LQ, the 4-step one for HQ):
    how well later chunks keep the per-clip tint the memory holds; ``gap_appearance`` is LQ - HQ.
    """
    r = cfg.recipe
    world = cfg.world_config()
    mcfg = student.config
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    labels = torch.arange(world.n_classes).repeat_interleave(n_per_class)
    frames = frames or cfg.frames
    noise = torch.randn(
        len(labels), mcfg.in_dim, frames, cfg.size, cfg.size, generator=torch.Generator().manual_seed(seed)
    )
    flow = WanCausalFlow(student, prompts.embed(labels), policy=memory or cfg.memory, rope=rope or cfg.rope)
    hq_grid = r.sigmas(r.align_reference_steps)

    written: dict[str, list[Tensor]] = {"lq": [], "hq": []}

    def lq_writer(flow_c, x0, noise_c, replay):
        written["lq"].append(x0)
        return x0  # what the LQ path writes anyway (the writer draws nothing, so the rollout is unchanged)

    def hq_writer(flow_c, x0, noise_c, replay):
        written["hq"].append(rollout(flow_c, noise_c, hq_grid, generator=replay, grad_exit=False).x0)
        return written["hq"][-1]

    videos = {
        q: chunked_rollout(
            flow,
            noise,
            r.sigmas(r.align_steps),
            generator=torch.Generator().manual_seed(seed + 3),
            grad_exit=False,
            context_sigma=r.context_sigma,
            writer=writer,
        ).x0
        for q, writer in (("lq", lq_writer), ("hq", hq_writer))
    }
    ref = reference_clips(cfg, labels, frames, seed)
    res = {}
    for q, video in videos.items():
        for k, v in vm.evaluate_video(video, labels, ref, config=world, chunk_frames=cfg.chunk_frames).items():
            res[f"{q}_{k}"] = v
        cache = torch.cat(written[q], dim=2)
        res[f"{q}_appearance"] = float(
            vm.appearance_error(video, cfg.chunk_frames, reference=cache, config=world).mean()
        )
    res["gap_fidelity"] = res["lq_fidelity"] - res["hq_fidelity"]
    res["gap_appearance"] = res["lq_appearance"] - res["hq_appearance"]
    return res


@torch.no_grad()
def alignment_probe(
    student: WanModel, teacher: WanModel, cfg: SmallVideoConfig, *, batches: int = 8, batch: int = 4, seed: int = 99
) -> dict[str, float]:
    """Salt's alignment term measured on fixed draws (no training): what ``loss_align`` would log for ``student``.

    Exactly the training draw (the recipe's 2-step list exiting at its second step, the 4-step reference path with
    its own cache, the teacher's block features, TRD with the recipe's margin), on ``batches`` fixed batches of
    ``batch`` prompts, so students at different points of training are compared on the same noise. Also returns
    ``ref_mse``, the pixel MSE between the student's chunk outputs and the reference path's, ``frac_over``,
    the share of Gram entries whose difference exceeds the margin (the only ones the loss sees), and the same three
    with the suffix ``_floor`` for a reference path on the student's own 2-step grid (same draws otherwise). The
    reference path replays the student's own random draws (``chunked_rollout``), so that path is the student's
    and the floor is 0: what ``loss_align`` measures is the grid and the cache, not two different samples' noise.
    """
    from salt_ref.feature_align import sample_align_sigmas
    from salt_ref.schedule import add_noise, randn_like, sigma_to_t

    r = cfg.recipe
    world = cfg.world_config()
    mcfg = student.config
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    g = torch.Generator().manual_seed(seed)
    out = {f"{k}{sfx}": 0.0 for k in ("loss_align", "ref_mse", "frac_over") for sfx in ("", "_floor")}
    for _ in range(batches):
        ctx, _ = prompts.sample(batch, g)
        noise = torch.randn(batch, mcfg.in_dim, cfg.frames, cfg.size, cfg.size, generator=g)
        flow = WanCausalFlow(student, ctx, policy=cfg.memory, rope=cfg.rope)
        start = g.get_state()
        for sfx, ref_steps in (("_floor", r.align_steps), ("", r.align_reference_steps)):
            g.set_state(start)  # both probes see the same draws
            ro = chunked_rollout(
                flow,
                noise,
                r.sigmas(r.align_steps),
                exit_index=r.align_exit,
                generator=g,
                grad_exit=False,
                reference_sigmas=r.sigmas(ref_steps),
                context_sigma=r.context_sigma,
            )
            sigma = sample_align_sigmas(batch, shift=r.shift, t_max=r.align_t_max, generator=g)
            eps = randn_like(ro.x0, g)
            z = []
            for x in (ro.x0, ro.x0_ref):
                xs = add_noise(x, eps, sigma)
                h = teacher(xs, sigma_to_t(sigma), ctx, features=(r.align_block,), features_only=True)[r.align_block]
                z.append(torch.nn.functional.normalize(h.unflatten(1, (cfg.frames, -1)), dim=-1))
            diff = (z[0] @ z[0].transpose(-1, -2) - z[1] @ z[1].transpose(-1, -2)).abs()
            out["loss_align" + sfx] += float(torch.relu(diff - r.align_margin).mean()) / batches
            out["frac_over" + sfx] += float((diff > r.align_margin).float().mean()) / batches
            out["ref_mse" + sfx] += float((ro.x0 - ro.x0_ref).pow(2).mean()) / batches
    return out

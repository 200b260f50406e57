r"""The small video setup: Salt in miniature on the procedural video world, a tiny Wan at every role.

Pipeline (each stage through the shared loop, each cached on disk and reused when present)::

    teacher  bidirectional tiny WanModel, flow matching on world clips with CFG dropout     (salt_ref.pretrain)
    init     causal tiny WanModel regressed on the teacher's CFG ODE trajectories (ODE init)
             (``teacher="exact"``: the trajectories, and DMD's real score, of toy.exact_video's exact flow of a bank
             of world clips; the critic's start and Salt's block features stay the network's)
    distil   self-forcing | sc-dmd | salt over chunk-wise rollouts through the KV cache  (salt_ref.video_task)

A whole run (train, evaluate, write its files) and its evaluation are ``toy.run_video``.

The class label stands in for the prompt: its embedding (``toy.video_world.class_embedding``) is the text state
``[B, L, D]`` and ``null_embedding`` is the unconditional branch of CFG. Clips are ``[B, 3, F, H, W]`` in [-1, 1].
Every schedule here (ODE-init grids, distillation, evaluation, the cache-gap experiment) is the run's
:class:`~salt_ref.recipe.Recipe` (the ``small`` preset unless given).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from salt_ref import checkpoint as ckpt
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import LoopConfig, train
from salt_ref.models.wan import WanConfig, WanModel
from salt_ref.pretrain import FlowMatchingTask, ODERegressionTask, teacher_trajectories
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.video_task import VIDEO_METHODS, VideoDistillTask, VideoTaskConfig
from toy import video_world as vw
from toy.exact_video import BANK_CLIPS, ExactWorldTeacher

__all__ = [
    "SmallVideoConfig",
    "ClassPrompts",
    "model_config",
    "get_teacher",
    "real_teacher",
    "TEACHERS",
    "add_teacher_argument",
    "get_student_init",
    "build_task",
    "distill_loop",
    "load_module",
    "CACHE_DIR",
]


WORLD_TINT = 0.9  # the small setup's world: off channels of the class colour tinted per clip in [-1, -0.1]


@dataclass
class SmallVideoConfig:
    """The small-scale run: world, model size, the budgets of the three stages, and the recipe.

    ``memory`` is a parsed :class:`~salt_ref.kv_cache.MemoryPolicy`; ``recipe`` is stored with the terms of
    ``method`` switched on. :meth:`to_dict` / :meth:`from_dict` are the run's ``config.json``.
    """

    method: str = "salt"
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    rope: str = "absolute"
    frames: int = 8
    size: int = 16
    chunk_frames: int = 2
    patch: int = 4
    dim: int = 128
    layers: int = 4
    heads: int = 4
    teacher_iters: int = 3000
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    # the shift of the teacher's logit-normal training levels (``salt_ref.schedule.sample_sigmas``): at 1, 1.4% of
    # the draws fall above sigma = 0.9, where a small disc's place in each frame is still being decided
    teacher_shift: float = 1.0
    # the real score (DMD) and the ODE init's trajectories: "network", the flow-matching teacher above, or "exact",
    # the exact flow of a bank of world clips (toy.exact_video; block features still come from the network)
    teacher: str = "network"
    exact_bank: int = BANK_CLIPS  # world clips in the exact teacher's bank (teacher "exact" only)
    batch: int = 4  # clips per generator and per critic update of the distillation
    ode_pairs: int = 64
    ode_iters: int = 300
    ode_grid_steps: int = 16  # the teacher's DDIM grid for the ODE pairs
    ode_record_steps: int = 8  # states kept at this list's levels (it holds the 4- and 2-step levels too)
    recipe: Recipe = field(default_factory=lambda: PRESETS["small"])
    seed: int = 0
    # the tinted world: a per-clip tint that only the frames (so, later, the KV cache) carry (toy.video_world)
    world: dict = field(default_factory=lambda: {"tint": WORLD_TINT})

    def __post_init__(self) -> None:
        if self.method not in VIDEO_METHODS:
            raise ValueError(f"unknown video method {self.method!r}; choose one of {list(VIDEO_METHODS)}")
        if not isinstance(self.memory, MemoryPolicy):
            raise TypeError(f"memory must be a MemoryPolicy (parse strings once, at the CLI), got {self.memory!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose one of {list(TEACHERS)}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.exact_bank < self.world_config().n_classes:
            raise ValueError(f"exact_bank must hold at least one clip per class, got {self.exact_bank}")
        if not self.teacher_shift > 0:
            raise ValueError(f"teacher_shift must be positive, got {self.teacher_shift}")
        if self.memory.bounded and self.memory.window < self.chunk_frames:
            # checked here, before the teacher trains for minutes: a chunk must fit the attention window
            raise ValueError(
                f"memory {self.memory} keeps {self.memory.window} frames, less than a chunk of {self.chunk_frames}"
            )
        self.recipe = self.recipe.for_method(self.method)

    def to_dict(self) -> dict:
        d = {**asdict(self), "memory": str(self.memory)}
        changed = self._changed(_LATER_RUN_KEYS)  # so that older runs' fingerprints (and resumes) stay valid
        return {k: v for k, v in d.items() if k not in _LATER_RUN_KEYS or k in changed}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> SmallVideoConfig:
        """Read back :meth:`to_dict`; an unknown or bad setting raises ``ValueError`` naming ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown settings {unknown}")
        data = dict(data)
        try:
            if "memory" in data:
                data["memory"] = MemoryPolicy.parse(data["memory"])
            if "recipe" in data:
                data["recipe"] = Recipe.from_dict(data["recipe"])
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def _changed(self, keys: tuple[str, ...]) -> dict:
        """The settings of ``keys`` that differ from their defaults (settings added after runs and caches were
        made enter keys and fingerprints only then, so those runs and caches keep their names)."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) != _DEFAULTS[k]}

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
        key = {k: asdict(self)[k] for k in keys}
        # settings added after teachers were cached enter the key only away from their default, so those caches
        # keep their names
        key.update(self._changed(_LATER_TEACHER_KEYS))
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]

    def init_key(self) -> str:
        keys = ("chunk_frames", "ode_pairs", "ode_iters", "ode_grid_steps", "ode_record_steps")
        r = self.recipe
        key = {**{k: asdict(self)[k] for k in keys}, "cfg_scale": r.cfg_scale, "shift": r.shift}
        key.update(self._changed(_LATER_INIT_KEYS))
        blob = json.dumps(key, sort_keys=True)
        return self.teacher_key() + "-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


_DEFAULTS = {f.name: f.default for f in fields(SmallVideoConfig)}
_LATER_TEACHER_KEYS = ("teacher_shift",)
_LATER_INIT_KEYS = ("teacher", "exact_bank")  # they change the ODE init
_LATER_RUN_KEYS = (*_LATER_INIT_KEYS, "batch")
TEACHERS = ("network", "exact")


def add_teacher_argument(parser: argparse.ArgumentParser) -> None:
    """``--teacher network|exact`` on a command line that builds a :class:`SmallVideoConfig` (its ``teacher``)."""
    parser.add_argument(
        "--teacher",
        choices=list(TEACHERS),
        default=SmallVideoConfig.teacher,
        help="the real score and the ODE init's trajectories: the trained network, or the exact flow of a bank of "
        "world clips (toy.exact_video; Salt's alignment and the critic's start stay the network's)",
    )


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


def load_module(path: Path, model: torch.nn.Module, prefix: str = "ema") -> torch.nn.Module:
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
        _say(progress, f"training the teacher ({cfg.teacher_iters} steps), cached at {run_dir}")
        desc = "1/3 teacher (flow matching)"
        task = FlowMatchingTask(model, batch_fn, shift=cfg.teacher_shift)
        train(task, loop, run_dir, resume=done.exists(), progress=progress, desc=desc)
    else:
        _say(progress, f"reusing the cached teacher at {run_dir}")
    return load_module(done, WanModel(mcfg)).requires_grad_(False)


def _say(progress: bool, message: str) -> None:
    """A line on stderr about the cached stages, beside the progress bars (quiet without them)."""
    if progress:
        import sys

        print(message, file=sys.stderr, flush=True)


def real_teacher(cfg: SmallVideoConfig, network: WanModel) -> torch.nn.Module:
    """The real score of ``cfg.teacher``: the trained ``network`` itself, or the exact flow of a bank of world
    clips (:class:`toy.exact_video.ExactWorldTeacher`, whose block features are the network's)."""
    if cfg.teacher == "network":
        return network
    world = cfg.world_config()
    prompts = ClassPrompts(world, network.config.text_len, network.config.text_dim)
    return ExactWorldTeacher(world, network, prompts, bank_clips=cfg.exact_bank)


def get_student_init(cfg: SmallVideoConfig, teacher: WanModel, cache_dir: Path, *, progress: bool = True) -> WanModel:
    """The causal student after ODE regression on the CFG trajectories of ``cfg.teacher`` (cached); its start is
    the network ``teacher``'s weights under the causal mask."""
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
            real_teacher(cfg, teacher),
            noise,
            prompts.embed(labels),
            prompts.null(cfg.ode_pairs),
            cfg.recipe.sigmas(cfg.ode_grid_steps),
            cfg.recipe.sigmas(cfg.ode_record_steps),
            cfg_scale=cfg.recipe.cfg_scale,
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
        _say(progress, f"training the student init ({cfg.ode_iters} ODE-regression steps), cached at {run_dir}")
        train(task, loop, run_dir, resume=done.exists(), progress=progress, desc="2/3 student init (ODE regression)")
    else:
        _say(progress, f"reusing the cached student init at {run_dir}")
    return load_module(done, WanModel(mcfg), prefix="generator")


def build_task(cfg: SmallVideoConfig, teacher: WanModel, init: WanModel) -> VideoDistillTask:
    """Student from the ODE init, critic from the flow-matching teacher, real score ``cfg.teacher``'s."""
    world = cfg.world_config()
    mcfg = model_config(cfg, causal=True)
    task_cfg = VideoTaskConfig(
        method=cfg.method,
        latent=(mcfg.in_dim, cfg.frames, cfg.size, cfg.size),
        memory=cfg.memory,
        rope=cfg.rope,
        batch=cfg.batch,
        recipe=cfg.recipe,
    )
    critic = copy.deepcopy(teacher).requires_grad_(True)
    prompts = ClassPrompts(world, mcfg.text_len, mcfg.text_dim)
    real = real_teacher(cfg, teacher)
    return VideoDistillTask(task_cfg, copy.deepcopy(init).requires_grad_(True), critic, real, prompts)


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

r"""The distillation recipe: every setting of the method in one frozen object, passed by reference.

A :class:`Recipe` holds what decides the losses and the samplers, and nothing about models, data or optimisers::

    schedule     shift s                         sigmas = denoising_sigmas(n, s);   t = 1000 sigma (schedule)
    training     (n, p_n) in zip(steps, step_probs)   n ~ p,  exit k ~ U{0..n-1}
    DMD          sigma ~ clip(warp(U[0, 1), s), dmd_sigma_min, dmd_sigma_max);   real = cond + cfg_scale (cond - uncond)
                 g normalised per sample or per batch (dmd_normalizer)
    SC           lambda = sc_weight on n = sc_fine_steps draws with k < n - 1, endpoints on sc_segments boundaries
    alignment    w = align_weight on (n, k) = (align_steps, align_exit) draws from iteration align_start;
                 teacher block align_block, TRD margin align_margin, reference grid align_reference_steps,
                 levels t ~ U[0, align_t_max]
    sampling     sample_steps (the inference list of evaluation and generation)
    cache        context_sigma: level of the context pass that writes a finished chunk into the KV cache

Its defaults are the constants of the modules that own each idea (``sc_dmd.SC_LAMBDA``, ``dmd.DMD_SIGMA_MIN``,
``feature_align.ALIGN_WEIGHT``, ...), so each default is written once. A method turns terms on or off in one
place, :meth:`Recipe.for_method`; named presets (:data:`PRESETS`) are the released Wan recipe and the toy worlds'.
A recipe is built once (from the CLI or a preset), stored in every run's checkpoint header and
``final_metrics.json`` (:meth:`Recipe.to_dict`), and read back with :meth:`Recipe.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from salt_ref.dmd import CFG_SCALE, DMD_SIGMA_MAX, DMD_SIGMA_MIN, NORMALIZERS
from salt_ref.feature_align import ALIGN_T_MAX, ALIGN_WEIGHT, TRD_MARGIN
from salt_ref.sc_dmd import SC_LAMBDA, SC_SEGMENTS
from salt_ref.schedule import SHIFT, denoising_sigmas

__all__ = ["Recipe", "METHOD_TERMS", "PRESETS", "preset"]

# Which terms each method trains with: the only place a method name switches a loss term.
METHOD_TERMS: dict[str, dict[str, Any]] = {
    "dmd": {"sc_weight": 0.0, "align": False},  # mixed 8/4/2 lists, DMD only
    "sc-dmd": {"align": False},  # + the SC term
    "cd": {"sc_weight": 0.0, "align": False},  # consistency distillation: no DMD terms at all
    "self-forcing": {"steps": (4,), "step_probs": (1.0,), "sc_weight": 0.0, "align": False},
    "salt": {"align": True},  # SC-DMD + cache-conditioned feature alignment
}


@dataclass(frozen=True)
class Recipe:
    """The method's settings (see the module docstring for the role of each)."""

    shift: float = SHIFT
    steps: tuple[int, ...] = (8, 4, 2)
    step_probs: tuple[float, ...] = (0.4, 0.4, 0.2)
    sample_steps: int = 4
    cfg_scale: float = CFG_SCALE
    dmd_sigma_min: float = DMD_SIGMA_MIN
    dmd_sigma_max: float = DMD_SIGMA_MAX
    dmd_normalizer: str = "sample"
    sc_weight: float = SC_LAMBDA
    sc_fine_steps: int = 8
    sc_segments: int = SC_SEGMENTS
    sc_target: str = "live"
    align: bool = False
    align_weight: float = ALIGN_WEIGHT
    align_margin: float = TRD_MARGIN
    align_block: int = 20
    align_start: int = 200  # generator iterations: the release's mmd_start_step 1000 counts critic updates (x5)
    align_steps: int = 2
    align_exit: int = 1
    align_reference_steps: int = 4
    align_t_max: float = ALIGN_T_MAX
    context_sigma: float = 0.0

    def __post_init__(self) -> None:
        # JSON and CLI hand lists: store tuples so recipes compare and hash by value
        object.__setattr__(self, "steps", tuple(int(n) for n in self.steps))
        object.__setattr__(self, "step_probs", tuple(float(p) for p in self.step_probs))
        if self.shift <= 0:
            raise ValueError(f"recipe: shift must be positive, got {self.shift}")
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"recipe: steps must be positive step counts, got {self.steps}")
        if len(self.steps) != len(self.step_probs) or abs(sum(self.step_probs) - 1) > 1e-6 or min(self.step_probs) < 0:
            raise ValueError(f"recipe: steps {self.steps} and step_probs {self.step_probs} must pair up, sum to 1")
        if self.sample_steps < 1:
            raise ValueError(f"recipe: sample_steps must be >= 1, got {self.sample_steps}")
        if not 0.0 <= self.dmd_sigma_min <= self.dmd_sigma_max <= 1.0:
            raise ValueError(f"recipe: need 0 <= dmd_sigma_min <= dmd_sigma_max <= 1, got "
                             f"{self.dmd_sigma_min}, {self.dmd_sigma_max}")  # fmt: skip
        if self.dmd_normalizer not in NORMALIZERS:
            raise ValueError(f"recipe: dmd_normalizer must be one of {list(NORMALIZERS)}, got {self.dmd_normalizer!r}")
        if self.sc_weight < 0 or self.align_weight < 0:
            raise ValueError("recipe: sc_weight and align_weight must be >= 0")
        if self.sc_target not in ("live", "ema"):
            raise ValueError(f"recipe: sc_target must be 'live' or 'ema', got {self.sc_target!r}")
        if self.sc_fine_steps % self.sc_segments:
            raise ValueError(f"recipe: a {self.sc_fine_steps}-step list cannot be cut into {self.sc_segments} segments")
        if not 0 <= self.align_exit < self.align_steps:
            raise ValueError(f"recipe: align_exit must be in [0, {self.align_steps}), got {self.align_exit}")
        if self.align_start < 0 or self.align_block < 0:
            raise ValueError("recipe: align_start and align_block must be >= 0")
        if not 0.0 <= self.context_sigma < 1.0:
            raise ValueError(f"recipe: context_sigma must be in [0, 1), got {self.context_sigma}")

    # -- the terms ----------------------------------------------------------------------------------
    @property
    def sc_on(self) -> bool:
        """The SC term is trained (on ``sc_fine_steps`` draws)."""
        return self.sc_weight > 0

    @property
    def align_on(self) -> bool:
        """Salt's cache-conditioned alignment is trained (needs a causal student)."""
        return self.align and self.align_weight > 0

    def for_method(self, method: str) -> Recipe:
        """This recipe with the terms of ``method`` (:data:`METHOD_TERMS`) switched on or off."""
        if method not in METHOD_TERMS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHOD_TERMS)}")
        return replace(self, **METHOD_TERMS[method])

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (validated like a new recipe)."""
        return replace(self, **changes)

    def draw_step_list(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """``(n, k)``: a step list ``n ~ step_probs`` and an exit step ``k ~ U{0..n-1}``."""
        j = int(torch.multinomial(torch.tensor(self.step_probs), 1, generator=generator))
        n = self.steps[j]
        return n, int(torch.randint(n, (1,), generator=generator))

    # -- the grids ----------------------------------------------------------------------------------
    def sigmas(self, n_steps: int) -> Tensor:
        """The warped ``n_steps`` list with its terminal 0, ``[n_steps + 1]``."""
        return denoising_sigmas(n_steps, self.shift)

    def sample_sigmas(self, n_steps: int | None = None) -> Tensor:
        """The inference list (``sample_steps`` unless ``n_steps`` is given), ``[n + 1]``."""
        return self.sigmas(n_steps or self.sample_steps)

    # -- storage ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """A recipe read back from a run's files; unknown keys are named in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"recipe: unknown settings {unknown}; known are {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, Recipe] = {
    # Salt on Wan 2.1 as released: shift 5, mixed 8/4/2 lists, CFG 3, SC 0.2, alignment 0.1 at teacher block 20.
    "wan": Recipe(),
    # The toy video world (tiny 4-block Wans): CFG 2 (the best of a teacher sweep), alignment from the start at
    # block 2 of 4.
    "small": Recipe(cfg_scale=2.0, align_start=0, align_block=2),
    # The 2D mixtures: unconditional (no CFG) and no warp (shift 1), chosen by `python -m toy.sweep_2d`.
    "toy": Recipe(cfg_scale=0.0, shift=1.0),
    # The video recipe on 2D (shift 5 for 480p video), kept as the ablation `--recipe toy-video`.
    "toy-video": Recipe(cfg_scale=0.0),
}


def preset(name: str, method: str | None = None, **changes: Any) -> Recipe:
    """The preset ``name`` with ``changes``, then the terms of ``method`` if given."""
    if name not in PRESETS:
        raise ValueError(f"unknown recipe preset {name!r}; choose one of {sorted(PRESETS)}")
    recipe = PRESETS[name].replace(**changes)
    return recipe.for_method(method) if method is not None else recipe

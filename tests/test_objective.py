"""Which loss terms a recipe trains, draw by draw; the recipe reaching every consumer; non-finite networks stop runs.

The table test spells out, for the released recipe, which terms appear for each (step list, exit index,
iteration): DMD always, SC on 8-step draws except the last step, the alignment on 2-step draws exiting at step 1
from ``align_start``. It is written literally so that a change of the rule in the code fails it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salt_ref import dmd, feature_align
from salt_ref.cache_condition import reference_exit_index
from salt_ref.distill import DMDObjective, default_rollout
from salt_ref.loop import LoopConfig, NonFiniteLossError, train
from salt_ref.recipe import METHOD_TERMS, PRESETS, Recipe
from salt_ref.updates import rollout

SHAPE = (2, 3, 2, 2, 2)  # [B, C, F, H, W]: two frames of 2x2


class _Net(nn.Module):
    """A per-pixel linear flow ``v = W x + b * sigma`` on the channel dim (shape-agnostic, cheap)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        y = self.lin(x.movedim(1, -1)).movedim(-1, 1)
        return y + sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _objective(recipe: Recipe, teacher=None) -> DMDObjective:
    student, critic, feats = _Net(0), _Net(1), nn.Linear(3, 4)
    teacher = teacher or _Net(2)

    def rollout_fn(noise, sigmas, *, exit_index, generator, grad_exit=True, on_exit=None, reference_sigmas=None):
        ro = rollout(student, noise, sigmas, exit_index=exit_index, generator=generator, grad_exit=grad_exit,
                     on_exit=on_exit)  # fmt: skip
        if reference_sigmas is not None:  # what the chunk-wise rollout's reference path returns
            k_ref = reference_exit_index(reference_sigmas, ro.sigma_exit)
            ro.x0_ref = rollout(student, noise, reference_sigmas, exit_index=k_ref, grad_exit=False).x0
        return ro

    def feature_fn(x, sigma):  # [B, C, F, H, W] -> [B, F * H * W, 4]
        return feats(x.flatten(2).transpose(1, 2))

    return DMDObjective(
        recipe=recipe,
        rollout_fn=rollout_fn,
        noise_fn=lambda g: torch.randn(SHAPE, generator=g),
        real_flow=teacher,
        fake_flow=critic,
        feature_fn=feature_fn,
        frames=SHAPE[2],
    )


def _terms(logs: dict) -> set[str]:
    return {k for k in logs if k.startswith("loss_") and k != "loss_gen"}


def _expected(n: int, k: int, it: int, start: int) -> set[str]:
    terms = {"loss_dmd"}
    if n == 8 and k < 7:
        terms.add("loss_sc")
    if (n, k) == (2, 1) and it >= start:
        terms.add("loss_align")
    return terms


def test_loss_terms_per_step_list_exit_and_iteration():
    recipe = PRESETS["wan"].for_method("salt").replace(align_start=3)
    obj = _objective(recipe)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for n in (8, 4, 2):
        for k in range(n):
            for it in (0, 2, 3, 10):
                _, logs = obj.loss(obj.plan(n, k, it, g), g)
                assert _terms(logs) == _expected(n, k, it, 3), (n, k, it, logs)
                assert logs["n_steps"] == n and logs["exit"] == k
                seen += 1
    assert seen == 14 * 4


@pytest.mark.parametrize(
    "method, sc, align",
    [("dmd", False, False), ("sc-dmd", True, False), ("self-forcing", False, False), ("salt", True, True)],
)
def test_each_method_switches_its_terms(method, sc, align):
    recipe = PRESETS["wan"].for_method(method).replace(align_start=0)
    assert recipe.sc_on is sc and recipe.align_on is align
    obj = _objective(recipe)
    g = torch.Generator().manual_seed(1)
    lists = (4,) if method == "self-forcing" else (8, 4, 2)
    assert recipe.steps == lists
    for n in lists:
        for k in range(n):
            _, logs = obj.loss(obj.plan(n, k, 0, g), g)
            assert ("loss_sc" in logs) == (sc and n == 8 and k < 7)
            assert ("loss_align" in logs) == (align and (n, k) == (2, 1))


def test_method_terms_table_is_the_only_switch():
    assert set(METHOD_TERMS) == {"dmd", "sc-dmd", "cd", "self-forcing", "salt"}
    with pytest.raises(ValueError, match="unknown method"):
        Recipe().for_method("dmd2")


def test_the_recipe_shift_reaches_dmd_critic_and_alignment(monkeypatch):
    seen: dict[str, list[float]] = {"dmd": [], "align": []}
    real_dmd, real_align = dmd.sample_dmd_sigmas, feature_align.sample_align_sigmas

    def spy_dmd(batch, *, shift, **kw):
        seen["dmd"].append(shift)
        return real_dmd(batch, shift=shift, **kw)

    def spy_align(batch, *, shift, **kw):
        seen["align"].append(shift)
        return real_align(batch, shift=shift, **kw)

    monkeypatch.setattr(dmd, "sample_dmd_sigmas", spy_dmd)
    monkeypatch.setattr(feature_align, "sample_align_sigmas", spy_align)
    recipe = PRESETS["wan"].for_method("salt").replace(shift=2.5, align_start=0)
    obj = _objective(recipe)
    g = torch.Generator().manual_seed(0)
    obj.loss(obj.plan(2, 1, 0, g), g)
    obj.critic_loss(g)
    assert seen["dmd"] == [2.5, 2.5] and seen["align"] == [2.5]
    torch.testing.assert_close(obj.plan(4, 0, 0, g).sigmas, recipe.sigmas(4))


def test_recipe_validation_names_the_setting():
    with pytest.raises(ValueError, match="step_probs"):
        Recipe(steps=(8, 4), step_probs=(0.5, 0.4))
    with pytest.raises(ValueError, match="align_exit"):
        Recipe(align_steps=2, align_exit=2)
    with pytest.raises(ValueError, match="unknown settings"):
        Recipe.from_dict({"shift": 5.0, "sc_lambda": 0.2})
    r = PRESETS["small"].for_method("salt")
    assert Recipe.from_dict(r.to_dict()) == r


class _Task:
    critic = None

    def __init__(self, objective: DMDObjective, student: nn.Module):
        self.objective, self.generator = objective, student

    def generator_loss(self, it, rng, ema):
        return self.objective.generator_loss(rng.local, None, it, shared=rng.shared)


@pytest.mark.parametrize("broken", ["teacher", "critic"])
def test_a_non_finite_teacher_or_critic_stops_the_run(broken, tmp_path):
    student = _Net(0)
    nan_net = lambda x, sigma: torch.full_like(x, float("nan"))  # noqa: E731
    flows = {"teacher": (nan_net, _Net(1)), "critic": (_Net(2), nan_net)}[broken]
    obj = DMDObjective(
        recipe=PRESETS["toy"].for_method("dmd"),
        rollout_fn=default_rollout(student),
        noise_fn=lambda g: torch.randn(SHAPE, generator=g),
        real_flow=flows[0],
        fake_flow=flows[1],
    )
    with pytest.raises(NonFiniteLossError, match="gen loss is nan at iteration 0"):
        train(_Task(obj, student), LoopConfig(iters=2, critic_ratio=0), tmp_path, progress=False)

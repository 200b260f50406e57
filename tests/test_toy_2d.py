"""The 2D world's rules: the mode-share error, the ODE initialisation, the DMD normalisers, the evaluation draw,
the references, and the 2D preset (each test pins a rule with a closed-form or literal value)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from salt_ref.distill import as_flow
from salt_ref.dmd import dmd_direction
from salt_ref.recipe import PRESETS, Recipe
from salt_ref.schedule import x0_from_flow
from toy.gmm import GaussianMixture, gaussian_flow_map, make_target, mix5
from toy.metrics_2d import evaluate_2d, mode_shares, mode_tv
from toy.setup_2d import (
    TEACHER_STEPS,
    Toy2DConfig,
    build_init,
    build_task,
    eval_seed,
    evaluate,
    ode_pairs,
    references,
    term_gradients,
    toy_loop,
)

THREE = GaussianMixture(
    means=torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]),
    stds=torch.tensor([0.2, 0.4, 0.1]),
    weights=torch.tensor([0.5, 0.3, 0.2]),
)


def test_mode_tv_of_samples_all_in_one_mode_is_one_minus_its_weight():
    x = THREE.means[1].expand(500, 2).clone()  # every sample at the centre of the 0.3 mode
    assert mode_tv(x, THREE) == pytest.approx(1 - 0.3, abs=1e-6)
    assert_close(mode_shares(x, THREE), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_mode_tv_of_true_samples_is_sampling_noise_only():
    x = THREE.sample(40_000, torch.Generator().manual_seed(0))
    assert mode_tv(x, THREE) < 0.01  # 1/2 sum |q_k - w_k| with q_k unbiased: ~ sqrt(w (1 - w) / N)


def test_mode_tv_counts_non_finite_samples_as_lost_mass():
    x = THREE.sample(1000, torch.Generator().manual_seed(1))
    x[:100] = math.nan
    clean = mode_tv(x[100:], THREE)
    assert mode_tv(x, THREE) >= 0.05 - 1e-9  # half of the 10% lost, at least
    assert mode_tv(x, THREE) > clean


def test_evaluate_2d_leads_with_energy_and_mode_tv_and_uses_the_head_for_distances():
    ref = THREE.sample(300, torch.Generator().manual_seed(2))
    x = THREE.sample(3000, torch.Generator().manual_seed(3))
    m = evaluate_2d(x, THREE, ref)
    assert list(m)[:2] == ["energy", "mode_tv"]
    x_tail_changed = torch.cat([x[:300], torch.zeros(2700, 2)])  # distances read only the first 300
    assert evaluate_2d(x_tail_changed, THREE, ref)["energy"] == pytest.approx(m["energy"], rel=1e-12)
    assert evaluate_2d(x_tail_changed, THREE, ref)["mode_tv"] > m["mode_tv"] + 0.3


def test_ode_pairs_follow_the_exact_flow_map_of_one_gaussian():
    one = GaussianMixture(torch.tensor([[1.0, -0.5]]), torch.tensor([0.3]), torch.tensor([1.0]))
    recipe = Recipe(shift=1.0)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    levels = recipe.sigmas(4)[:-1]
    states, endpoint = ode_pairs(one.flow, noise, recipe.sigmas(256), levels)
    assert states.shape == (64, 4, 2)
    assert torch.equal(states[:, 0], noise)  # level 1 is the noise itself
    for j, lv in enumerate(levels.tolist()):
        exact = gaussian_flow_map(noise, 1.0, lv, one.means[0], 0.3)
        assert_close(states[:, j], exact, atol=3e-3, rtol=0)
    assert_close(endpoint, gaussian_flow_map(noise, 1.0, 0.0, one.means[0], 0.3), atol=1e-2, rtol=0)  # Euler


def test_ode_pairs_refuse_levels_off_the_grid():
    with pytest.raises(ValueError, match="not all on the 4-step grid"):
        ode_pairs(THREE.flow, torch.zeros(2, 2), Recipe(shift=1.0).sigmas(4), torch.tensor([0.9]))


def test_ode_init_regresses_the_student_onto_the_teachers_ode_endpoints():
    cfg = Toy2DConfig(method="dmd", target="mix5", hidden=32, depth=2, batch=128, pretrain_iters=20,
                      ode_iters=400, ode_pairs=1024, recipe=PRESETS["toy"])  # fmt: skip
    gmm = mix5()
    init = build_init(cfg, gmm, gmm.flow)
    recipe = cfg.recipe
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))  # fresh noise, not the training pairs
    _, phi = ode_pairs(gmm.flow, z, recipe.sigmas(cfg.ode_grid_steps), recipe.sigmas(1)[:1])
    one = torch.ones(512)
    with torch.no_grad():
        err = {name: (x0_from_flow(z, one, as_flow(m)(z, one)) - phi).pow(2).mean().item()
               for name, m in (("student", init.student), ("critic", init.critic))}  # fmt: skip
    # the flow fit's one-step endpoint is the posterior mean E[x0 | z] ~ the data mean; the ODE init learns Phi(z)
    assert err["student"] < 0.85 * err["critic"], err  # a no-op fit would give 1


def test_cd_starts_from_the_flow_fit_and_the_dmd_student_from_the_ode_init():
    base = dict(target="ring8", hidden=16, depth=2, batch=32, pretrain_iters=5, ode_iters=5, ode_pairs=64)
    gmm = make_target("ring8")
    dmd = build_init(Toy2DConfig(method="dmd", **base), gmm, gmm.flow)
    cd = build_init(Toy2DConfig(method="cd", **base), gmm, gmm.flow)
    same = all(torch.equal(a, b) for a, b in zip(dmd.critic.parameters(), cd.critic.parameters(), strict=True))
    assert same  # the pre-fit is seeded by the seed alone
    assert not all(torch.equal(a, b) for a, b in zip(dmd.student.parameters(), dmd.critic.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(cd.student.parameters(), cd.critic.parameters(), strict=True))


def test_batch_normaliser_is_one_scale_and_sample_normaliser_is_per_point():
    x0 = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    real, fake = torch.zeros(2, 2), torch.ones(2, 2)
    assert_close(dmd_direction(x0, real, fake, normalizer="sample"), torch.tensor([[1.0, 1.0], [1 / 3, 1 / 3]]))
    assert_close(dmd_direction(x0, real, fake, normalizer="batch"), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="unknown DMD normalizer"):
        dmd_direction(x0, real, fake, normalizer="pixel")


def test_every_seed_draws_its_own_evaluation_and_methods_of_a_seed_share_it():
    assert eval_seed(0) != eval_seed(1)
    recipe = PRESETS["toy"]
    a, xa = evaluate(THREE.flow, THREE, recipe, n=200, n_modes=200, steps=(2,), mode="ddim", seed=0)
    b, xb = evaluate(THREE.flow, THREE, recipe, n=200, n_modes=200, steps=(2,), mode="ddim", seed=0)
    c, xc = evaluate(THREE.flow, THREE, recipe, n=200, n_modes=200, steps=(2,), mode="ddim", seed=1)
    assert torch.equal(xa[2], xb[2]) and not torch.equal(xa[2], xc[2])


def test_references_put_the_exact_teacher_above_the_data_floor():
    refs = references(THREE, PRESETS["toy"], n=400, n_modes=4000, seed=0)
    assert refs["teacher"]["steps"] == TEACHER_STEPS == 50
    assert refs["data"]["mode_tv"] < 0.03 and refs["teacher"]["mode_tv"] < 0.05
    assert refs["teacher"]["energy"] < 0.05 and refs["data"]["energy"] < 0.05
    assert refs["teacher"]["composition_defect"] > 0  # the exact teacher's DDIM path is not straight


def test_the_2d_preset_is_made_for_2d_and_the_video_recipe_stays_available():
    toy, video = PRESETS["toy"], PRESETS["toy-video"]
    assert video == Recipe(cfg_scale=0.0)  # the video recipe, unconditional
    assert toy.cfg_scale == 0.0 and toy.shift == 1.0  # no warp: see toy.sweep_2d
    assert Toy2DConfig().recipe.shift == toy.shift


def test_the_preset_is_the_sweeps_base():
    # docs/results.md: "The preset is the sweep's base". BASE is written out in toy.sweep_2d so that re-running the
    # sweep reproduces its table; this keeps the preset, the toy loop and the start from drifting away from it.
    from toy.setup_2d import TOY_LOOP
    from toy.sweep_2d import BASE

    cfg, toy = Toy2DConfig(), PRESETS["toy"]
    assert {k: TOY_LOOP[k] for k in ("iters", "lr_gen", "lr_critic")} == {k: BASE[k] for k in ("iters", "lr_gen",
                                                                                             "lr_critic")}  # fmt: skip
    assert toy_loop().critic_ratio == BASE["critic_ratio"]
    assert (toy.shift, toy.dmd_normalizer) == (BASE["shift"], BASE["dmd_normalizer"])
    assert (cfg.ode_iters, cfg.pretrain_lr) == (BASE["ode_iters"], BASE["pretrain_lr"])


def _tiny_sc_task(sc_weight: float = 0.2):
    cfg = Toy2DConfig(method="sc-dmd", target="ring8", hidden=32, depth=2, batch=64, pretrain_iters=20, ode_iters=20,
                      ode_pairs=256, recipe=PRESETS["toy"].replace(sc_weight=sc_weight))  # fmt: skip
    return build_task(cfg)


def test_term_gradients_measure_each_term_alone_whatever_the_runs_weight():
    task = _tiny_sc_task()
    pull = term_gradients(task, draws=1, seed=3)
    # DMD's gradient, by hand, on the same first draw that takes the SC term (8 steps, 0 < exit < 7)
    shared = torch.Generator().manual_seed(3)
    on = task.objective.recipe.replace(sc_weight=1.0)
    from dataclasses import replace

    obj = replace(task.objective, recipe=on)
    while (draw := obj.draw(0, shared)).sc_points is None or draw.exit_index == 0:
        pass
    grads = []
    for objective in (replace(task.objective, recipe=on.replace(sc_weight=0.0)), obj):  # L_DMD, then L_DMD + L_SC
        task.generator.zero_grad(set_to_none=True)
        objective.loss(draw, torch.Generator().manual_seed(4))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.generator.parameters()]))
    assert pull["dmd"] == pytest.approx(float(grads[0].norm()), rel=1e-5)
    assert pull["sc"] == pytest.approx(float((grads[1] - grads[0]).norm()), rel=1e-4)
    assert pull["sc"] > 0 and -1 <= pull["cos"] <= 1
    assert pull["ratio"] == pytest.approx(pull["dmd"] / pull["sc"], rel=1e-5)
    # the SC norm is per unit weight: a run trained with lambda 2 is measured exactly like one with 0.2
    assert term_gradients(_tiny_sc_task(2.0), draws=1, seed=3) == pytest.approx(pull, rel=1e-5)


def test_bench_2d_writes_every_table_and_reads_its_cells_back(tmp_path, capsys):
    from toy import bench_2d

    argv = ["--targets", "ring8", "--seeds", "0", "1", "--sc-sweep", "0", "0.2", "1", "--sweep-target", "ring8",
            "--iters", "2", "--init-iters", "5", "--workers", "1", "--out", str(tmp_path)]  # fmt: skip
    assert bench_2d.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    # ode-init, cd, dmd, sc-dmd x 2 seeds, and the sweep's lambda 1 (lambda 0 and 0.2 are the DMD and SC-DMD cells)
    assert "10 runs, 10 of them trained by this invocation" in table.splitlines()[0]
    for heading in ("**ring8**", "SC-DMD against DMD, paired by seed", "did to their start, the ODE init",
                    "How hard the SC term pulls", "SC weight sweep on ring8"):  # fmt: skip
        assert heading in table
    # the 4-step-against-2 count covers every trained DMD-family run: 2 DMD, 2 SC-DMD, 2 of the sweep's lambda 1
    assert any(line.startswith("| ring8 |") and line.endswith("of 6 |") for line in table.splitlines())
    capsys.readouterr()
    assert bench_2d.main(argv) == 0  # a finished benchmark is read back, not retrained
    assert "10 runs, 0 of them trained by this invocation" in (tmp_path / "table.md").read_text().splitlines()[0]

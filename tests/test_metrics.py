"""Sample metrics (sliced W2, energy distance, k-NN precision/recall), toy mode metrics, composition defect.

Each test states the law it checks; the flows are exact (ring8's mixture flow, a point mass's straight flow).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from salt_ref.metrics import (
    composition_defect,
    energy_distance,
    precision_recall_knn,
    rollout_composition_defect,
    sliced_wasserstein,
)
from salt_ref.sc_dmd import coarse_boundaries, sc_loss
from salt_ref.schedule import append_dims, denoising_sigmas
from toy.gmm import GaussianMixture, ring8
from toy.metrics_2d import (
    assign_modes,
    evaluate_2d,
    high_quality_share,
    modes_captured,
    off_manifold_mass,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ring8_samples(n: int, seed: int) -> torch.Tensor:
    return ring8().sample(n, _gen(seed))


def _sub_mixture(gmm: GaussianMixture, modes: list[int]) -> GaussianMixture:
    return GaussianMixture(gmm.means[modes], gmm.stds[modes], torch.ones(len(modes)))


MU = torch.tensor([0.5, -1.0])


def point_mass_flow(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact flow of data ``x0 = MU``: ``v = eps - MU = (x - MU) / sigma`` (straight paths, DDIM is exact)."""
    return (x - MU.to(x)) / append_dims(sigma, x)


# ---------------------------------------------------------------------------------------- distances


def test_identical_sets_are_at_distance_zero():
    x = _ring8_samples(500, 0)
    assert sliced_wasserstein(x, x.clone()) == 0.0
    assert energy_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-12)


def test_duplicated_set_is_the_same_empirical_measure():
    # N != M: x and [x, x] put the same mass at the same points, so both distances vanish
    x = _ring8_samples(300, 1)
    xx = torch.cat([x, x])
    assert sliced_wasserstein(x, xx) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, xx) == pytest.approx(0.0, abs=1e-12)


def test_distances_grow_with_shift():
    x, y = _ring8_samples(300, 2), _ring8_samples(200, 3)
    shifts = [0.0, 0.25, 1.0, 4.0]
    sw = [sliced_wasserstein(x, y + torch.tensor([d, 0.0])) for d in shifts]
    en = [energy_distance(x, y + torch.tensor([d, 0.0])) for d in shifts]
    assert sw == sorted(sw) and sw[-1] > 10 * sw[0]
    assert en == sorted(en) and en[-1] > 10 * en[0]


def test_sliced_w2_of_a_translate_is_norm_over_sqrt_dim():
    # x against x + d: every projection is shifted by theta.d, so SW2^2 = mean (theta.d)^2 ~ |d|^2 / D
    x = torch.randn(400, 3, generator=_gen(4))
    d = torch.tensor([3.0, 0.0, 4.0])
    assert sliced_wasserstein(x, x + d, n_projections=2000) == pytest.approx(5.0 / math.sqrt(3), rel=0.05)


def test_sliced_w2_is_deterministic_given_generator():
    x, y = _ring8_samples(200, 5), _ring8_samples(300, 6)
    assert sliced_wasserstein(x, y, generator=_gen(7)) == sliced_wasserstein(x, y, generator=_gen(7))
    assert sliced_wasserstein(x, y) == sliced_wasserstein(x, y)  # default generator is seeded


def test_energy_distance_of_point_masses():
    # delta_0 against delta_a: 2|a| - 0 - 0
    x, y = torch.zeros(10, 2), torch.tensor([[3.0, 4.0]]).expand(7, 2)
    assert energy_distance(x, y) == pytest.approx(10.0)


def test_energy_distance_same_distribution_small_vs_shifted():
    x, y = _ring8_samples(1000, 8), _ring8_samples(1000, 9)
    same = energy_distance(x, y)
    shifted = energy_distance(x, y + torch.tensor([0.3, 0.3]))
    assert same < 0.02 and shifted > 10 * same


def test_energy_distance_does_not_depend_on_chunking():
    x, y = _ring8_samples(200, 10), _ring8_samples(150, 11)
    assert energy_distance(x, y, chunk_size=7) == pytest.approx(energy_distance(x, y), rel=1e-10)


@given(
    n=st.integers(2, 20),
    m=st.integers(2, 20),
    seed=st.integers(0, 2**16),
    shift=st.floats(-5, 5),
)
def test_distances_are_symmetric_nonnegative_and_translation_invariant(n, m, seed, shift):
    g = _gen(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(m, 3, generator=g, dtype=torch.float64)
    for dist in (energy_distance, sliced_wasserstein):
        d = dist(x, y)
        assert d >= 0
        assert dist(y, x) == pytest.approx(d, rel=1e-9, abs=1e-12)
        assert dist(x + shift, y + shift) == pytest.approx(d, rel=1e-6, abs=1e-9)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        energy_distance(torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall_knn(torch.zeros(5, 2), torch.zeros(50, 2), k=5)


# ---------------------------------------------------------------------------------------- precision / recall


def test_precision_recall_of_same_distribution_is_near_one():
    p, r = precision_recall_knn(_ring8_samples(1000, 12), _ring8_samples(1000, 13))
    assert p > 0.95 and r > 0.95


def test_precision_drops_for_samples_off_the_manifold():
    ref = _ring8_samples(1000, 14)
    box = torch.rand(500, 2, generator=_gen(15)) * 8 - 4
    p, r = precision_recall_knn(torch.cat([_ring8_samples(500, 16), box]), ref)
    assert p < 0.6 and r > 0.95


def test_recall_drops_when_half_the_modes_are_missed():
    half = _sub_mixture(ring8(), [0, 1, 2, 3]).sample(1000, _gen(17))
    p, r = precision_recall_knn(half, _ring8_samples(1000, 18))
    assert p > 0.95 and r < 0.6


# ---------------------------------------------------------------------------------------- mode metrics


def test_exact_samples_capture_all_eight_modes():
    x = _ring8_samples(2000, 19)
    assert modes_captured(x, ring8()) == 8
    assert high_quality_share(x, ring8()) > 0.97  # 1 - exp(-9/2) = 0.989 in expectation
    assert off_manifold_mass(x, ring8()) == 0.0


def test_samples_from_three_modes_capture_three():
    x = _sub_mixture(ring8(), [0, 3, 5]).sample(2000, _gen(20))
    assert modes_captured(x, ring8()) == 3


def test_a_few_stray_samples_do_not_capture_a_mode():
    gmm = ring8()
    x = torch.cat([_sub_mixture(gmm, [0, 1]).sample(1995, _gen(21)), gmm.means[2].expand(5, 2)])
    assert modes_captured(x, gmm) == 2  # 5 < 5% of 2000 / 8
    assert modes_captured(x, gmm, min_share=0.0) == 3  # but at least one sample is always required


def test_uniform_samples_on_a_big_box_are_low_quality():
    x = torch.rand(4000, 2, generator=_gen(22)) * 20 - 10
    assert high_quality_share(x, ring8()) < 0.02


def test_far_away_and_nonfinite_samples_are_off_manifold():
    far = torch.randn(100, 2, generator=_gen(23)) + 100.0
    assert off_manifold_mass(far, ring8()) == 1.0
    assert off_manifold_mass(torch.full((4, 2), float("nan")), ring8()) == 1.0


def test_assign_modes_finds_the_mode_and_scales_by_its_std():
    gmm = ring8(std=0.1)
    idx, dist = assign_modes(gmm.means + torch.tensor([0.2, 0.0]), gmm)
    assert idx.tolist() == list(range(8))
    assert torch.allclose(dist, torch.full((8,), 2.0, dtype=dist.dtype))
    with pytest.raises(ValueError, match="D=2"):
        assign_modes(torch.zeros(3, 3), gmm)


def test_evaluate_2d_reports_every_metric():
    gmm = ring8()
    out = evaluate_2d(_ring8_samples(500, 24), gmm, _ring8_samples(500, 25), generator=_gen(0))
    assert set(out) == {"sw", "energy", "mode_tv", "modes", "hq_share", "off_manifold", "precision", "recall"}
    assert out["modes"] == 8 and out["precision"] > 0.9 and out["sw"] < 0.5
    bad = _ring8_samples(500, 26)
    bad[:10] = float("nan")
    worse = evaluate_2d(bad, gmm, _ring8_samples(500, 25))
    assert math.isinf(worse["sw"]) and worse["off_manifold"] == pytest.approx(10 / 500)


# ---------------------------------------------------------------------------------------- composition defect


def test_composition_defect_is_zero_for_point_mass_flow():
    x_s = torch.randn(64, 2, generator=_gen(27), dtype=torch.float64)
    d = composition_defect(point_mass_flow, x_s, 0.8, 0.5, 0.1)
    assert d.shape == (64,)
    assert float(d.max()) < 1e-6


def test_composition_defect_is_positive_for_ring8_flow():
    gmm = ring8()
    x_s = (1 - 0.6) * _ring8_samples(256, 28) + 0.6 * torch.randn(256, 2, generator=_gen(29))
    d = composition_defect(gmm.flow, x_s, 0.6, 0.4, 0.0)
    assert bool(torch.isfinite(d).all()) and float(d.mean()) > 0.05


def test_composition_defect_is_the_step_weighted_flow_gap():
    # |one - two| / |one - x_s| = ((m - e) / (s - e)) |v2 - v1| / |v1|, and it reproduces SC-DMD's loss
    gmm, s, m, e = ring8(), 0.7, 0.45, 0.2
    x_s = torch.randn(32, 2, generator=_gen(30), dtype=torch.float64)
    sig = torch.full((32,), s, dtype=torch.float64)
    v1 = gmm.flow(x_s, sig)
    v2 = gmm.flow(x_s - (s - m) * v1, torch.full_like(sig, m))
    expected = (m - e) / (s - e) * (v2 - v1).norm(dim=1) / v1.norm(dim=1)
    d = composition_defect(gmm.flow, x_s, sig, m, e)
    torch.testing.assert_close(d, expected)
    l_sc = (1 - s) * (d * (s - e) * v1.norm(dim=1)).pow(2).mean() / x_s.shape[1]
    torch.testing.assert_close(sc_loss(x_s, s, v1, gmm.flow, m, e), l_sc)


def test_composition_defect_rejects_unordered_levels():
    with pytest.raises(ValueError, match="sigma_s > sigma_m > sigma_e"):
        composition_defect(point_mass_flow, torch.randn(4, 2), 0.5, 0.6, 0.1)


def test_rollout_composition_defect_separates_straight_and_curved_flows():
    fine = denoising_sigmas(8, 5.0, dtype=torch.float64)
    coarse = coarse_boundaries(fine)
    noise = torch.randn(256, 2, generator=_gen(31), dtype=torch.float64)
    curved = rollout_composition_defect(ring8().flow, noise, fine, coarse)
    straight = rollout_composition_defect(point_mass_flow, noise, fine, coarse)
    assert math.isfinite(curved) and curved > 0.05
    assert straight < 1e-6
    renoised = rollout_composition_defect(ring8().flow, noise, fine, coarse, mode="renoise", generator=_gen(32))
    assert math.isfinite(renoised) and renoised > 0.05

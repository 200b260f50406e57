"""Property tests for the core maths: schedule, updates, DMD, SC-DMD and the exact Gaussian-mixture oracles.

Each test is named after the law it checks (see ``../shared/DESIGN.md`` sections 1-2 and the module
docstrings). Torch randomness inside a test always comes from a ``torch.Generator`` seeded by a
hypothesis-drawn integer, so every failing example replays exactly. Tolerance-sensitive maths runs in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

from salt_ref.dmd import dmd_direction, dmd_loss
from salt_ref.sc_dmd import sc_loss, sc_points
from salt_ref.schedule import (
    add_noise,
    denoising_sigmas,
    eps_from_flow,
    eps_from_x0,
    flow_from_eps_x0,
    flow_from_x0,
    warp,
    x0_from_flow,
)
from salt_ref.updates import ancestral_update, ddim_update, renoise_update, rollout, sample, update
from toy.gmm import GaussianMixture, gaussian_flow_map

F64 = torch.float64
EPS64 = torch.finfo(F64).eps

# ---------------------------------------------------------------------------------------------- strategies

seeds = st.integers(min_value=0, max_value=2**32 - 1)
shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5).map(tuple)
shifts = st.floats(min_value=0.01, max_value=100.0)
unit = st.floats(min_value=0.0, max_value=1.0)
positive_sigma = st.floats(min_value=1e-3, max_value=1.0)  # (0, 1], kept off 0 so 1/sigma is well-conditioned
sigma_kinds = st.sampled_from(["float", "tensor0d", "per_sample"])
modes = st.sampled_from(["ddim", "renoise", "ancestral"])
three_levels = st.lists(unit, min_size=3, max_size=3).map(sorted)  # -> [low, mid, high]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every tensor here is tiny: intra-op threads only add sync overhead (large on a busy machine)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(shape, generator=gen, dtype=F64)


def _sigma(kind: str, value: float, batch: int, gen: torch.Generator, lo: float = 1e-3, hi: float = 1.0):
    """A noise level as a python float, a 0-d tensor, or a per-sample ``[B]`` tensor drawn in ``[lo, hi]``."""
    if kind == "float":
        return value
    if kind == "tensor0d":
        return torch.tensor(value, dtype=F64)
    return lo + (hi - lo) * torch.rand(batch, generator=gen, dtype=F64)


def _bcast(sigma, x: Tensor) -> Tensor:
    """Broadcast ``sigma`` against ``x [B, ...]`` (written here independently of ``append_dims``)."""
    s = torch.as_tensor(sigma, dtype=x.dtype)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim == 1 else s


# --------------------------------------------------------------------------------------------------- warp


@given(shift=shifts)
def test_warp_fixes_0_and_1(shift):
    ends = warp(torch.tensor([0.0, 1.0], dtype=F64), shift)
    assert ends[0].item() == 0.0
    # 1 is fixed up to rounding: 1 + (s - 1) is not always exactly s in floating point (e.g. s = 0.1)
    assert abs(ends[1].item() - 1.0) <= 4 * EPS64


@given(shift=shifts, a=unit, b=unit)
def test_warp_is_strictly_monotone(shift, a, b):
    lo, hi = sorted((a, b))
    assume(hi - lo >= 1e-9)
    pair = warp(torch.tensor([lo, hi], dtype=F64), shift)
    assert pair[0] < pair[1]
    grid = warp(torch.linspace(0, 1, 1001, dtype=F64), shift)
    assert bool((grid[1:] > grid[:-1]).all())


@given(sigma=unit, a=st.floats(min_value=0.05, max_value=20.0), b=st.floats(min_value=0.05, max_value=20.0))
def test_warp_composes(sigma, a, b):
    x = torch.tensor(sigma, dtype=F64)
    assert_close(warp(warp(x, a), b), warp(x, a * b), rtol=1e-12, atol=1e-15)
    # a group: the inverse shift undoes a warp
    assert_close(warp(warp(x, a), 1 / a), x, rtol=1e-12, atol=1e-15)


@given(sigma=unit, seed=seeds)
def test_warp_with_shift_one_is_identity(sigma, seed):
    x = torch.tensor(sigma, dtype=F64)
    assert warp(x, 1.0).item() == sigma
    grid = torch.rand(17, generator=_gen(seed), dtype=F64)
    assert torch.equal(warp(grid, 1.0), grid)


@given(sigma=unit, shift=shifts)
def test_warp_is_the_shift_formula(sigma, shift):
    # the group laws above also hold for e.g. sigma ** (1 / s); this pins the Wan/SD3 form itself
    x = torch.tensor(sigma, dtype=F64)
    assert_close(warp(x, shift) * (1 + (shift - 1) * x), shift * x, rtol=1e-12, atol=1e-15)


def test_denoising_sigmas_is_the_self_forcing_list():
    expected = torch.tensor([1.0, 0.9375, 2.5 / 3.0, 0.625, 0.0], dtype=F64)
    assert_close(denoising_sigmas(4, 5.0, dtype=F64), expected, rtol=0.0, atol=1e-15)


# ------------------------------------------------------------------------------------ schedule conversions


@given(shape=shapes, seed=seeds, kind=sigma_kinds, value=positive_sigma)
def test_conversions_round_trip(shape, seed, kind, value):
    gen = _gen(seed)
    x0 = _randn(shape, gen, 3.0)
    eps = _randn(shape, gen)
    sigma = _sigma(kind, value, shape[0], gen)
    s = _bcast(sigma, x0)

    x = add_noise(x0, eps, sigma)
    assert x.shape == x0.shape
    assert_close(x, (1 - s) * x0 + s * eps, rtol=1e-12, atol=1e-12)
    v = flow_from_eps_x0(eps, x0)
    assert torch.equal(v, eps - x0)

    tol = dict(rtol=1e-9, atol=1e-9)
    assert_close(x0_from_flow(x, sigma, v), x0, **tol)
    assert_close(eps_from_flow(x, sigma, v), eps, **tol)
    assert_close(flow_from_x0(x, sigma, x0), v, **tol)
    assert_close(eps_from_x0(x, sigma, x0), eps, **tol)
    # and from an arbitrary state and flow: x0 <-> flow are inverse maps at a fixed (x, sigma)
    w = _randn(shape, gen, 2.0)
    assert_close(flow_from_x0(x, sigma, x0_from_flow(x, sigma, w)), w, **tol)
    assert_close(eps_from_x0(x, sigma, x0_from_flow(x, sigma, w)), eps_from_flow(x, sigma, w), **tol)


# ------------------------------------------------------------------------------------------------ updates


@given(shape=shapes, seed=seeds, kind=sigma_kinds, t=unit)
def test_ddim_update_from_t_to_t_is_identity(shape, seed, kind, t):
    gen = _gen(seed)
    x, v = _randn(shape, gen), _randn(shape, gen, 5.0)
    sigma = _sigma(kind, t, shape[0], gen, lo=0.0)
    assert torch.equal(update(x, sigma, sigma, v, mode="ddim"), x)
    assert torch.equal(ddim_update(x, sigma, sigma, v), x)


@given(shape=shapes, seed=seeds, kind=sigma_kinds, t=unit)
def test_renoise_update_from_t_to_t_with_eps_hat_is_identity(shape, seed, kind, t):
    # with *fresh* noise a t -> t re-noise is not the identity; with the implied noise eps_hat it is
    gen = _gen(seed)
    x, v = _randn(shape, gen), _randn(shape, gen, 5.0)
    sigma = _sigma(kind, t, shape[0], gen, lo=0.0)
    eps_hat = eps_from_flow(x, sigma, v)
    assert_close(update(x, sigma, sigma, v, mode="renoise", noise=eps_hat), x, rtol=1e-12, atol=1e-12)


@given(shape=shapes, seed=seeds, kind=sigma_kinds, t=unit)
def test_renoise_update_at_zero_returns_endpoint(shape, seed, kind, t):
    gen = _gen(seed)
    x, v, noise = _randn(shape, gen), _randn(shape, gen, 5.0), _randn(shape, gen)
    sigma_t = _sigma(kind, t, shape[0], gen, lo=0.0)
    zero = torch.zeros(shape[0], dtype=F64) if kind == "per_sample" else 0.0
    x0_hat = x - _bcast(sigma_t, x) * v
    assert torch.equal(renoise_update(x0_hat, zero, noise), x0_hat)
    assert torch.equal(update(x, sigma_t, zero, v, mode="renoise", noise=noise), x0_from_flow(x, sigma_t, v))


@given(shape=shapes, seed=seeds, kind=sigma_kinds, t=st.floats(min_value=0.01, max_value=1.0), frac=unit)
def test_ddim_update_equals_renoise_with_eps_hat(shape, seed, kind, t, frac):
    gen = _gen(seed)
    x, v = _randn(shape, gen, 2.0), _randn(shape, gen, 2.0)
    sigma_t = _sigma(kind, t, shape[0], gen, lo=0.01)
    sigma_s = frac * sigma_t
    ts, ss = _bcast(sigma_t, x), _bcast(sigma_s, x)
    x0_hat = x - ts * v
    eps_hat = (x - (1 - ts) * x0_hat) / ts
    expected = (1 - ss) * x0_hat + ss * eps_hat
    assert_close(ddim_update(x, sigma_t, sigma_s, v), expected, rtol=1e-9, atol=1e-9)
    assert_close(update(x, sigma_t, sigma_s, v, mode="ddim"), expected, rtol=1e-9, atol=1e-9)
    assert_close(renoise_update(x0_hat, sigma_s, eps_hat), expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------- exact flow maps and DDIM jumps


def _single_gaussian(mu: Tensor, c: float) -> tuple[GaussianMixture, Tensor, float]:
    """A one-component mixture plus its (float32-stored) mean and std read back in float64."""
    gmm = GaussianMixture(mu[None], torch.tensor([c]), torch.ones(1))
    return gmm, gmm.means[0].double(), float(gmm.stds[0])


def _ddim_jumps(flow, x: Tensor, levels: list[float]) -> Tensor:
    """Compose DDIM jumps along ``levels`` (first entry is the start level) with ``flow(x, sigma)``."""
    for hi, lo in zip(levels[:-1], levels[1:], strict=True):
        x = ddim_update(x, hi, lo, flow(x, torch.tensor(hi, dtype=F64)))
    return x


@given(seed=seeds, dim=st.integers(1, 4), c=st.floats(min_value=0.05, max_value=3.0), levels=three_levels)
def test_gaussian_flow_map_composes(seed, dim, c, levels):
    s, u, t = levels
    assume(t > u > s)
    gen = _gen(seed)
    mu, x = _randn((dim,), gen, 2.0), _randn((5, dim), gen, 2.0)
    two = gaussian_flow_map(gaussian_flow_map(x, t, u, mu, c), u, s, mu, c)
    assert_close(two, gaussian_flow_map(x, t, s, mu, c), rtol=1e-10, atol=1e-10)


@settings(max_examples=max(5, settings.default.max_examples // 3))  # ~900 small flow evaluations each
@given(seed=seeds, c=st.floats(min_value=0.1, max_value=1.0), levels=st.lists(unit, min_size=2, max_size=2))
def test_gaussian_flow_map_matches_integrated_gmm_flow(seed, c, levels):
    s, t = sorted(levels)
    assume(t - s >= 1e-3)
    gen = _gen(seed)
    gmm, mu, c64 = _single_gaussian(torch.randn(2, generator=gen), c)
    x = (1 - t) * gmm.sample(8, generator=gen).double() + t * _randn((8, 2), gen)
    exact = gaussian_flow_map(x, t, s, mu, c64)

    def euler(n_steps: int) -> Tensor:
        grid = torch.linspace(t, s, n_steps + 1, dtype=F64).tolist()
        y = x
        for hi, lo in zip(grid[:-1], grid[1:], strict=True):
            y = ddim_update(y, hi, lo, gmm.flow(y, hi))
        return y

    coarse, fine = euler(300), euler(600)
    scale = 1 + exact.abs().max().item()
    # first-order Euler is close; Richardson extrapolation of the two runs is second order and much closer
    assert (fine - exact).abs().max().item() <= 1e-2 * scale
    assert (2 * fine - coarse - exact).abs().max().item() <= 1e-4 * scale


@given(seed=seeds, shape=shapes, levels=three_levels)
def test_ddim_composes_for_point_mass_data(seed, shape, levels):
    s, u, t = levels
    assume(t - u >= 1e-6 and u - s >= 1e-6)
    gen = _gen(seed)
    mu = _randn(shape[1:], gen, 2.0)  # the single data point, broadcast over the batch
    x = _randn(shape, gen, 2.0)

    def point_mass_flow(y: Tensor, sigma: Tensor) -> Tensor:
        x0_hat = mu  # exact denoiser of a point mass for sigma > 0
        return (y - x0_hat) / sigma

    assert_close(
        _ddim_jumps(point_mass_flow, x, [t, s]), _ddim_jumps(point_mass_flow, x, [t, u, s]), rtol=1e-9, atol=1e-9
    )


def _ddim_gain(t: float, s: float, c: float) -> float:
    """DDIM with the exact denoiser of N(mu, c^2) maps ``x - a_t mu`` to ``k(t, s) (x - a_t mu)``."""
    a_t, a_s = 1 - t, 1 - s
    return (a_s * a_t * c**2 + s * t) / (a_t**2 * c**2 + t**2)


@given(
    seed=seeds,
    dim=st.integers(1, 3),
    c=st.floats(min_value=0.1, max_value=1.0),
    levels=three_levels,
    r_norm=st.floats(min_value=0.5, max_value=3.0),
)
def test_ddim_does_not_compose_for_data_with_spread(seed, dim, c, levels, r_norm):
    s, u, t = levels
    assume(t - u >= 0.05 and u - s >= 0.05)
    gen = _gen(seed)
    gmm, mu, c64 = _single_gaussian(_randn((dim,), gen, 2.0).float(), c)
    direction = _randn((4, dim), gen)
    r = r_norm * direction / direction.norm(dim=1, keepdim=True)  # offset from the noised mean a_t mu
    x = (1 - t) * mu + r
    gap = (_ddim_jumps(gmm.flow, x, [t, s]) - _ddim_jumps(gmm.flow, x, [t, u, s])).norm(dim=1)
    assert bool((gap > 1e-6).all()), gap
    # the gap is exactly what the linear-Gaussian algebra predicts
    predicted = abs(_ddim_gain(t, s, c64) - _ddim_gain(u, s, c64) * _ddim_gain(t, u, c64)) * r.norm(dim=1)
    assert_close(gap, predicted, rtol=1e-6, atol=1e-12)
    # while the exact flow map of the same data does compose
    two = gaussian_flow_map(gaussian_flow_map(x, t, u, mu, c64), u, s, mu, c64)
    assert_close(two, gaussian_flow_map(x, t, s, mu, c64), rtol=1e-10, atol=1e-10)


@given(
    seed=seeds,
    c1=st.floats(min_value=0.1, max_value=1.0),
    c2=st.floats(min_value=0.1, max_value=1.0),
    w=st.floats(min_value=0.2, max_value=0.8),
    levels=three_levels,
)
def test_ddim_does_not_compose_for_data_with_spread_mixture(seed, c1, c2, w, levels):
    s, u, t = levels
    assume(t - u >= 0.05 and u - s >= 0.05)
    gen = _gen(seed)
    means = torch.tensor([[-1.0, 0.3], [1.2, -0.4]])
    gmm = GaussianMixture(means, torch.tensor([c1, c2]), torch.tensor([w, 1 - w]))
    x = (1 - t) * gmm.sample(32, generator=gen).double() + t * _randn((32, 2), gen)
    gap = (_ddim_jumps(gmm.flow, x, [t, s]) - _ddim_jumps(gmm.flow, x, [t, u, s])).norm(dim=1)
    assert gap.mean().item() > 1e-6


# ------------------------------------------------------------------------------------------------- SC-DMD


@st.composite
def sc_setups(draw):
    """``(gen, batch, dim, sigma_s, m, e)``, ``s > m > e >= 0``; ``sigma_s`` a float or per-sample ``[B]``."""
    gen = _gen(draw(seeds))
    batch, dim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    e, m, s = draw(three_levels)
    assume(m - e >= 1e-3 and s - m >= 1e-3)
    if draw(st.booleans()):
        sigma_s = s
    else:  # per-sample levels, all above m
        sigma_s = m + (1 - m) * (0.05 + 0.95 * torch.rand(batch, generator=gen, dtype=F64))
    return gen, batch, dim, sigma_s, m, e


@given(setup=sc_setups())
def test_sc_loss_is_zero_for_constant_velocity(setup):
    gen, batch, dim, sigma_s, m, e = setup
    const = _randn((dim,), gen, 3.0)

    def constant_flow(y: Tensor, sigma: Tensor) -> Tensor:
        return const.expand_as(y)

    x_s = _randn((batch, dim), gen)
    v1 = const.expand(batch, dim).clone()
    assert abs(sc_loss(x_s, sigma_s, v1, constant_flow, m, e).item()) <= 1e-20


@given(setup=sc_setups())
def test_sc_loss_equals_scaled_velocity_gap(setup):
    gen, batch, dim, sigma_s, m, e = setup
    a_mat, b = _randn((dim, dim), gen), _randn((dim,), gen)

    def linear_flow(y: Tensor, sigma: Tensor) -> Tensor:  # sigma is [B]
        return y @ a_mat.T + sigma[:, None] * b

    x_s, v1 = _randn((batch, dim), gen), _randn((batch, dim), gen)
    s = _bcast(sigma_s, x_s)
    v2 = linear_flow(x_s - (s - m) * v1, torch.full((batch,), m, dtype=F64))
    per_sample = ((1 - s) * (m - e) ** 2 * (v1 - v2) ** 2).mean(dim=1)  # (1 - s_b)(m - e)^2 mean((v1 - v2)^2)
    loss = sc_loss(x_s, sigma_s, v1, linear_flow, m, e)
    assert_close(loss, per_sample.mean(), rtol=1e-9, atol=1e-15)
    if bool((s < 1).all()):  # at sigma_s = 1 the weight (1 - s) vanishes; otherwise the gap is positive
        assert loss.item() > 0


@given(setup=sc_setups())
def test_sc_loss_gradient_reaches_v1_only(setup):
    gen, batch, dim, sigma_s, m, e = setup
    target_net = nn.Linear(dim, dim, dtype=F64)
    with torch.no_grad():
        for p in target_net.parameters():
            p.copy_(_randn(tuple(p.shape), gen))

    def target_flow(y: Tensor, sigma: Tensor) -> Tensor:
        return target_net(y)

    x_s = _randn((batch, dim), gen).requires_grad_()
    v1 = _randn((batch, dim), gen).requires_grad_()
    sc_loss(x_s, sigma_s, v1, target_flow, m, e).backward()

    assert target_net.weight.grad is None and target_net.bias.grad is None
    assert x_s.grad is None
    with torch.no_grad():
        s = _bcast(sigma_s, x_s)
        x_m = x_s - (s - m) * v1
        target = x_m - (m - e) * target_net(x_m)
        pred = x_s - (s - e) * v1
        expected = 2 * (1 - s) * (-(s - e)) * (pred - target) / v1.numel()
    assert_close(v1.grad, expected, rtol=1e-9, atol=1e-15)


@given(
    seed=seeds,
    n_segments=st.sampled_from([1, 2, 4]),
    stride=st.integers(1, 3),
    shift=st.floats(min_value=1.0, max_value=10.0),
    data=st.data(),
)
def test_sc_points_are_ordered_grid_points(seed, n_segments, stride, shift, data):
    n_fine = n_segments * stride
    fine = denoising_sigmas(n_fine, shift, dtype=F64)
    assert sc_points(fine, n_fine - 1, n_segments=n_segments, generator=_gen(seed)) is None
    i = data.draw(st.integers(0, n_fine - 1), label="exit_index")
    out = sc_points(fine, i, n_segments=n_segments, generator=_gen(seed))
    if i == n_fine - 1:
        assert out is None
        return
    assert out is not None
    e, m = out
    s, below = float(fine[i]), float(fine[i + 1])
    coarse = [float(fine[j * stride]) for j in range(n_segments)] + [0.0]
    assert s > m > e >= 0
    assert e < below
    assert e in coarse
    assert e in sorted((b for b in coarse if b < below), reverse=True)[:2]
    assert m in [float(p) for p in fine[1:]]


# ---------------------------------------------------------------------------------------------------- DMD


@given(shape=shapes, seed=seeds, spread=st.floats(min_value=1e-2, max_value=10.0))
def test_dmd_loss_gradient_is_direction_over_numel(shape, seed, spread):
    gen = _gen(seed)
    x0 = _randn(shape, gen).requires_grad_()
    x0_real = x0.detach() + _randn(shape, gen, spread)
    x0_fake = x0_real + _randn(shape, gen)
    dmd_loss(x0, x0_real, x0_fake).backward()

    g = dmd_direction(x0.detach(), x0_real, x0_fake)
    normaliser = (x0.detach() - x0_real).abs().reshape(x0.shape[0], -1).mean(dim=1)
    assert_close(g, (x0_fake - x0_real) / _bcast(normaliser, x0), rtol=1e-12, atol=0.0)
    n = x0.numel()
    assert_close(x0.grad, g / n, rtol=1e-9, atol=1e-12 * (1 + g.abs().max().item()) / n)


@given(shape=shapes, seed=seeds, generator_matches_teacher=st.booleans())
def test_dmd_loss_zero_gradient_when_critic_agrees_with_teacher(shape, seed, generator_matches_teacher):
    gen = _gen(seed)
    x0 = _randn(shape, gen).requires_grad_()
    x0_real = x0.detach().clone() if generator_matches_teacher else _randn(shape, gen)
    loss = dmd_loss(x0, x0_real, x0_real.clone())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x0.grad, torch.zeros_like(x0))


def test_dmd_direction_normalises_per_sample_for_1d_batches():
    x0, x0_real, x0_fake = torch.tensor([1.0, 3.0]), torch.zeros(2), torch.ones(2)
    assert_close(dmd_direction(x0, x0_real, x0_fake), torch.tensor([1.0, 1.0 / 3.0]))


@given(shape=shapes, seed=seeds, spread=st.floats(min_value=1e-2, max_value=10.0))
def test_dmd_loss_value_is_half_mean_square_direction(shape, seed, spread):
    gen = _gen(seed)
    x0 = _randn(shape, gen)
    x0_real = x0 + _randn(shape, gen, spread)
    x0_fake = x0_real + _randn(shape, gen)
    g = dmd_direction(x0, x0_real, x0_fake)
    assert_close(dmd_loss(x0, x0_real, x0_fake), 0.5 * g.pow(2).mean(), rtol=1e-9, atol=0.0)


# ----------------------------------------------------------------------------------------- exact GMM oracle

MC_MIXTURE = GaussianMixture(
    means=torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
    stds=torch.tensor([0.3, 0.1, 0.5]),
    weights=torch.tensor([0.5, 0.3, 0.2]),
)


@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_gmm_denoise_matches_monte_carlo_posterior(sigma):
    gen = _gen(1000 + round(100 * sigma))
    queries = (1 - sigma) * MC_MIXTURE.sample(8, generator=gen).double() + sigma * _randn((8, 2), gen)
    prior = MC_MIXTURE.sample(200_000, generator=gen).double()
    # importance weights: the likelihood N(x; (1 - sigma) x0, sigma^2 I) of each prior draw
    log_w = -(queries[:, None, :] - (1 - sigma) * prior[None]).pow(2).sum(-1) / (2 * sigma**2)
    w = log_w.softmax(dim=1)
    assert (1 / w.pow(2).sum(dim=1)).min().item() > 1000  # enough effective samples for a stable estimate
    assert_close(MC_MIXTURE.denoise(queries, sigma), w @ prior, rtol=0.0, atol=0.05)


@given(seed=seeds, n_modes=st.integers(1, 4), dim=st.integers(1, 3), kind=sigma_kinds, value=positive_sigma)
def test_gmm_flow_is_consistent_with_denoise(seed, n_modes, dim, kind, value):
    gen = _gen(seed)
    gmm = GaussianMixture(
        2 * torch.randn(n_modes, dim, generator=gen),
        0.05 + 0.95 * torch.rand(n_modes, generator=gen),
        0.1 + torch.rand(n_modes, generator=gen),
    )
    x = _randn((6, dim), gen, 2.0)
    sigma = _sigma(kind, value, 6, gen)
    v, x0 = gmm.flow(x, sigma), gmm.denoise(x, sigma)
    assert v.shape == x0.shape == x.shape
    assert_close(x - _bcast(sigma, x) * v, x0, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ rollouts


def _linear_flow(dim: int, gen: torch.Generator):
    """A tiny trainable generator ``v = Linear([x, sigma])`` and its flow_fn."""
    net = nn.Linear(dim + 1, dim, dtype=F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(_randn(tuple(p.shape), gen, 0.5))

    def flow_fn(x: Tensor, sigma: Tensor) -> Tensor:  # sigma is [B]
        return net(torch.cat([x, sigma[:, None]], dim=1))

    return net, flow_fn


@given(
    seed=seeds,
    n_steps=st.integers(1, 6),
    shift=st.floats(min_value=1.0, max_value=6.0),
    mode=modes,
    batch=st.integers(1, 4),
    dim=st.integers(1, 3),
    data=st.data(),
)
def test_rollout_to_exit_keeps_k_plus_1_states_and_grad_only_at_exit(seed, n_steps, shift, mode, batch, dim, data):
    gen = _gen(seed)
    net, flow_fn = _linear_flow(dim, gen)
    sigmas = denoising_sigmas(n_steps, shift, dtype=F64)
    k = data.draw(st.integers(0, n_steps - 1), label="exit_index")
    x = _randn((batch, dim), gen)

    out = rollout(flow_fn, x, sigmas, mode=mode, generator=_gen(seed + 1), exit_index=k)
    assert out.exit_index == k
    assert len(out.states) == k + 1 and len(out.x0s) == k + 1
    assert out.x0.requires_grad and out.v_exit.requires_grad
    assert not any(state.requires_grad for state in out.states)  # every state was produced without grad
    assert not any(x0.requires_grad for x0 in out.x0s[:k])
    with torch.no_grad():
        expected_x0 = out.x_exit - sigmas[k] * flow_fn(out.x_exit, sigmas[k].expand(batch))
    assert_close(out.x0, expected_x0, rtol=1e-12, atol=1e-12)
    out.x0.sum().backward()
    assert net.weight.grad is not None and bool(net.weight.grad.abs().sum() > 0)

    frozen = rollout(flow_fn, x, sigmas, mode=mode, generator=_gen(seed + 1), exit_index=k, grad_exit=False)
    assert not frozen.x0.requires_grad
    assert_close(frozen.x0, out.x0.detach(), rtol=0.0, atol=0.0)


@given(
    seed=seeds,
    n_steps=st.integers(1, 6),
    shift=st.floats(min_value=1.0, max_value=6.0),
    mode=modes,
    batch=st.integers(1, 4),
    dim=st.integers(1, 3),
)
def test_full_rollout_ends_with_the_last_update(seed, n_steps, shift, mode, batch, dim):
    gen = _gen(seed)
    _, flow_fn = _linear_flow(dim, gen)
    sigmas = denoising_sigmas(n_steps, shift, dtype=F64)
    x = _randn((batch, dim), gen)

    with torch.no_grad():
        out = rollout(flow_fn, x, sigmas, mode=mode, generator=_gen(seed + 1))
        assert len(out.states) == n_steps and out.exit_index == n_steps - 1
        assert float(sigmas[-1]) == 0.0
        last = update(
            out.x_exit, out.sigma_exit, float(sigmas[-1]), out.v_exit, mode=mode, noise=_randn((batch, dim), gen)
        )
        assert_close(last, out.x0, rtol=1e-12, atol=1e-12)
        if mode == "ddim":  # every intermediate state is the DDIM update of the one before
            for j in range(n_steps - 1):
                v = flow_fn(out.states[j], sigmas[j].expand(batch))
                assert_close(
                    out.states[j + 1], ddim_update(out.states[j], sigmas[j], sigmas[j + 1], v), rtol=1e-12, atol=1e-12
                )
        sampled = sample(flow_fn, x, sigmas, mode=mode, generator=_gen(seed + 1))
        assert_close(sampled, out.x0, rtol=0.0, atol=0.0)


# The 8-step list of the released recipe (shift 5) and, per exit step, the endpoint candidates written out:
# the two highest 4-step boundaries [1, .9375, .8333, .625, 0] strictly below the next fine level.
_FINE8 = [1.0, 0.9722, 0.9375, 0.8929, 0.8333, 0.75, 0.625, 0.4167, 0.0]
_ENDPOINTS = {0: {0.9375, 0.8333}, 1: {0.8333, 0.625}, 2: {0.8333, 0.625}, 3: {0.625, 0.0}, 4: {0.625, 0.0},
              5: {0.0}, 6: {0.0}}  # fmt: skip


@pytest.mark.parametrize("exit_index", sorted(_ENDPOINTS))
def test_sc_points_draw_every_candidate_endpoint_and_midpoint(exit_index):
    fine = denoising_sigmas(8, 5.0)
    assert [round(v, 4) for v in fine.tolist()] == _FINE8
    g = torch.Generator().manual_seed(exit_index)
    draws = [sc_points(fine, exit_index, generator=g) for _ in range(400)]
    ends = [round(e, 4) for e, _ in draws]
    assert set(ends) == _ENDPOINTS[exit_index]
    for e in _ENDPOINTS[exit_index]:  # each candidate about equally often, not always the first
        assert ends.count(e) > 400 / len(_ENDPOINTS[exit_index]) * 0.7
        mids = {round(m, 4) for (e2, m) in draws if round(e2, 4) == e}
        assert mids == {p for p in _FINE8[1:] if e < p < _FINE8[exit_index]}


# ---------------------------------------------------------------------------------------------- the ancestral update


@settings(max_examples=20, deadline=None)
@given(c=st.floats(min_value=0.2, max_value=3.0), mode=st.sampled_from(["ddim", "ancestral", "renoise"]))
def test_many_small_steps_of_ddim_and_ancestral_sample_gaussian_data_and_renoise_does_not(c, mode):
    # data N(0, c^2): the exact flow is linear, v = (1 - k_t) x / t with x0_hat = k_t x, k_t = (1 - t) c^2 / V_t and
    # V_t = (1 - t)^2 c^2 + t^2 the noised variance. Every update is then x_s = A x_t + B eps', so the variance
    # runs as V <- A^2 V + B^2 (A: the update of x_t = 1 with eps' = 0; B: of x_t = 0 with eps' = 1), from V_1 = 1.
    sig = torch.linspace(1, 0, 401, dtype=F64)
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    var = 1.0
    for t, s in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        k = (1 - t) * c * c / ((1 - t) ** 2 * c * c + t * t)
        noise = {} if mode == "ddim" else {"noise": zero}
        a = update(one, t, s, (1 - k) * one / t, mode=mode, **noise)
        b = 0.0 if mode == "ddim" else float(update(zero, t, s, zero, mode=mode, noise=one))
        var = float(a) ** 2 * var + b**2
    if mode == "renoise":
        assert var < 0.6 * c * c  # the posterior's spread is dropped at every step
    else:
        assert var == pytest.approx(c * c, rel=0.03)


@given(shape=shapes, seed=seeds, t=positive_sigma, frac=unit)
def test_ancestral_update_is_identity_at_t_the_endpoint_at_zero_and_fresh_noise_from_one(shape, seed, t, frac):
    g = _gen(seed)
    x, v, noise = _randn(shape, g).double(), _randn(shape, g).double(), _randn(shape, g).double()
    assert_close(ancestral_update(x, t, t, v, noise), x)
    assert_close(ancestral_update(x, t, 0.0, v, noise), x0_from_flow(x, t, v))
    s = frac * 0.999  # from pure noise the posterior keeps nothing of x_1: the re-noise update
    assert_close(ancestral_update(x, 1.0, s, v, noise), renoise_update(x0_from_flow(x, 1.0, v), s, noise))
    assert_close(ancestral_update(x, 0.0, 0.0, v, noise), x)  # 0 / 0: the identity

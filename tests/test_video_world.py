"""The video world's physics and its network-free metrics: clean clips score near perfectly, each corruption is
caught by the metric meant for it, and bad inputs raise ``ValueError`` (``toy.video_world``, ``toy.video_metrics``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from toy import video_metrics as vm
from toy import video_world as vw

torch.set_num_threads(1)
CFG = vw.VideoWorldConfig()
N, FRAMES = 16, 24


@pytest.fixture(scope="module")
def clips():
    labels = torch.arange(N) % CFG.n_classes
    video, labels, state = vw.sample(N, torch.Generator().manual_seed(0), config=CFG, frames=FRAMES, label=labels)
    return video, labels, state


@pytest.fixture(scope="module")
def clean_fit(clips):
    return vm.fit_frames(clips[0])


def _stepped(state: vw.ClipState, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference physics by stepping: move, and mirror position and velocity at a wall crossed on the way."""
    lo, hi = state.radius[:, None], CFG.size - 1 - state.radius[:, None]
    p, v = state.p0.clone(), state.v.clone()
    ps, vs = [p], [v]
    for _ in range(frames - 1):
        p = p + v
        below, above = p < lo, p > hi
        p = torch.where(below, 2 * lo - p, torch.where(above, 2 * hi - p, p))
        v = torch.where(below | above, -v, v)
        ps.append(p)
        vs.append(v)
    return torch.stack(ps, 1), torch.stack(vs, 1)


def _blur(video: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    k = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, 7)
    n, c, f, h, w = video.shape
    x = (video + 1).permute(0, 2, 1, 3, 4).reshape(n * f * c, 1, h, w)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0)), k)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3)), k.transpose(-1, -2))
    return (x - 1).reshape(n, f, c, h, w).permute(0, 2, 1, 3, 4)


# --- the world ---------------------------------------------------------------------------------------------------


def test_sample_is_deterministic_for_a_seed_and_any_length():
    def draw(frames: int):
        return vw.sample(6, torch.Generator().manual_seed(3), config=CFG, frames=frames)

    short, labels, _ = draw(8)
    again, labels2, _ = draw(8)
    assert torch.equal(short, again) and torch.equal(labels, labels2)
    for frames in (1, 33, 64):
        long, labels3, _ = draw(frames)
        assert long.shape == (6, 3, frames, CFG.size, CFG.size)
        assert torch.equal(labels3, labels)  # the state does not depend on the length asked for
        k = min(frames, 8)
        assert torch.equal(long[:, :, :k], short[:, :, :k])
    assert vw.sample(4, torch.Generator().manual_seed(0))[0].shape[2] == CFG.frames
    other, _, _ = vw.sample(6, torch.Generator().manual_seed(4), config=CFG, frames=8)
    assert not torch.equal(other, short)


def test_render_shape_range_and_colour_of_the_class(clips):
    video, labels, state = clips
    assert video.shape == (N, 3, FRAMES, CFG.size, CFG.size) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    colour = CFG.palette[labels]  # [N, 3]
    assert torch.equal(state.colour, colour)
    off = (colour < 0)[:, :, None, None, None].expand_as(video)
    assert (video[off] == -1).all()  # channels off in the class colour stay at the background
    peak = ((video + 1) / 2).amax(dim=(1, 3, 4))  # [N, F]: the disc is in every frame
    assert peak.min() > 0.95
    area = ((video + 1) / 2).amax(dim=1).sum(dim=(-1, -2))  # sum of the soft mask: pi (r^2 + pi^2 e^2 / 3)
    expected = torch.pi * (state.radius[:, None] ** 2 + torch.pi**2 * CFG.edge**2 / 3)
    assert torch.allclose(area, expected.expand_as(area), rtol=0.03)


def test_bounces_match_stepped_physics_and_stay_in_the_box_for_64_frames(clips):
    _, _, state = clips
    frames = 64
    track, vel = vw.trajectory(state, frames), vw.velocity(state, frames)
    ref_p, ref_v = _stepped(state, frames)
    assert torch.allclose(track, ref_p, atol=1e-4)
    assert torch.allclose(vel, ref_v)
    r = state.radius[:, None, None]
    assert (track >= r - 1e-5).all() and (track <= CFG.size - 1 - r + 1e-5).all()
    assert torch.allclose(vel.abs(), state.v.abs()[:, None].expand_as(vel))  # elastic: speed kept per axis
    flips = (vel[:, 1:] != vel[:, :-1]).sum()
    assert flips >= N  # every clip hits walls in 64 frames
    # a flip happens exactly on steps that came back from a wall: step direction = new velocity
    steps = track.diff(dim=1)
    moved = steps.abs() > 1e-3
    flipped = vel[:, 1:] != vel[:, :-1]
    assert ((steps.sign() == vel[:, 1:].sign()) | ~moved | flipped).all()


@given(
    x=st.floats(0, 1),
    y=st.floats(0, 1),
    angle=st.floats(0, 6.3),
    speed=st.floats(0, 3),
    radius=st.floats(1.0, 3.0),
)
def test_trajectory_never_leaves_the_box_nor_exceeds_the_speed(x, y, angle, speed, radius):
    r = torch.tensor([radius])
    span = CFG.size - 1 - 2 * radius
    p0 = torch.tensor([[radius + x * span, radius + y * span]])
    v = speed * torch.tensor([[torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))]])
    state = vw.ClipState(p0, v, r, torch.tensor([0]), CFG.palette[:1], CFG.size)
    track = vw.trajectory(state, 50)
    assert (track >= radius - 1e-4).all() and (track <= CFG.size - 1 - radius + 1e-4).all()
    assert (track.diff(dim=1).abs() <= v.abs() + 1e-4).all()


def test_class_embedding_is_fixed_per_class_and_null_is_zero():
    labels = torch.tensor([0, 1, 2, 3, 1])
    ctx = vw.class_embedding(labels, 32, 8)
    assert ctx.shape == (5, 8, 32)
    assert torch.equal(ctx, vw.class_embedding(labels, 32, 8))
    assert torch.equal(ctx[1], ctx[4])
    assert torch.equal(vw.class_embedding(torch.tensor([3, 6]), 32, 8)[0], ctx[3])  # independent of the batch
    dist = torch.cdist(ctx[:4].flatten(1), ctx[:4].flatten(1))
    assert dist[~torch.eye(4, dtype=torch.bool)].min() > 10  # classes far apart
    assert torch.equal(vw.null_embedding(32, 8), torch.zeros(8, 32))


def test_bad_configs_and_inputs_raise_value_error():
    with pytest.raises(ValueError, match="even"):
        vw.VideoWorldConfig(size=15)
    with pytest.raises(ValueError, match="n_classes"):
        vw.VideoWorldConfig(n_classes=8)
    with pytest.raises(ValueError, match="radius"):
        vw.VideoWorldConfig(radius=(3.0, 8.0))
    with pytest.raises(ValueError, match="frames"):
        vw.sample(2, frames=0)
    with pytest.raises(ValueError, match="label"):
        vw.sample(2, label=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels"):
        vw.class_embedding(torch.tensor([-1]), 32, 8)
    with pytest.raises(ValueError, match="video"):
        vm.fit_frames(torch.zeros(2, 3, 4, 8))
    with pytest.raises(ValueError, match="video"):
        vm.fit_frames(torch.zeros(2, 3, 4, 8, 6))
    with pytest.raises(ValueError, match="channels"):
        vm.fit_frames(torch.zeros(2, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        vm.class_accuracy(torch.zeros(2, 3, 4, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="equal K"):
        vm.frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


# --- the metrics -------------------------------------------------------------------------------------------------


def test_clean_clips_score_near_perfectly(clips, clean_fit):
    video, labels, state = clips
    fit = clean_fit
    assert (fit.centre - vw.trajectory(state, FRAMES)).abs().max() < 0.01  # pixels
    assert (fit.radius - state.radius[:, None]).abs().max() < 0.01
    assert (fit.colour - state.colour[:, None]).abs().max() < 0.01
    assert fit.fidelity.max() < 1e-6
    start, vel, _ = vm.fit_tracks(fit, CFG.size)
    assert torch.allclose(start, state.p0, atol=1e-3) and torch.allclose(vel, state.v, atol=1e-3)
    assert vm.motion_coherence(video).max() < 1e-3
    assert vm.class_accuracy(video, labels) == 1.0
    assert torch.equal(vm.predict_labels(video), labels)


def test_clean_long_clips_fit_exactly_far_past_the_trained_length():
    video, _, state = vw.sample(4, torch.Generator().manual_seed(7), frames=96)
    fit = vm.fit_frames(video)
    assert (fit.centre - vw.trajectory(state, 96)).abs().max() < 0.01
    assert vm.drift_curve(video).max() < 1e-6
    assert vm.motion_coherence(video).max() < 1e-3


def test_noise_worsens_fidelity_monotonically(clips, clean_fit):
    video, labels, _ = clips
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(video.shape, generator=g)
    fid = [float(vm.frame_fidelity(video + s * noise).mean()) for s in (0.05, 0.1, 0.3)]
    assert fid[0] > 1000 * float(clean_fit.fidelity.mean())
    assert fid[0] < fid[1] < fid[2]
    assert fid[2] == pytest.approx(0.09, rel=0.2)  # ~ the noise variance: the disc is still found
    assert vm.class_accuracy(video + 0.3 * noise, labels) == 1.0


def test_shuffling_frames_in_time_breaks_motion_not_fidelity(clips):
    video, _, _ = clips
    shuffled = video[:, :, torch.randperm(FRAMES, generator=torch.Generator().manual_seed(2))]
    assert vm.motion_coherence(shuffled).mean() > 1.0  # pixels off any bouncing track
    assert vm.motion_coherence(video).mean() < 1e-3
    assert vm.frame_fidelity(shuffled).max() < 1e-6  # every frame on its own is still perfect


def test_drift_curve_rises_after_frames_are_blanked_or_blurred(clips):
    video, _, _ = clips
    k = 12
    blank = video.clone()
    blank[:, :, k:] = -1
    curve = vm.drift_curve(blank)
    assert curve.shape == (FRAMES,)
    assert curve[:k].max() < 1e-6 and curve[k:].min() > 0.01
    blurred = video.clone()
    blurred[:, :, k:] = _blur(video[:, :, k:])
    curve = vm.drift_curve(blurred)
    assert curve[:k].max() < 1e-6 and curve[k:].min() > 1e-3
    assert vm.motion_coherence(blurred).max() < 0.1  # blur moves no centre: motion stays coherent


def test_wrong_class_clips_lower_class_accuracy(clips):
    video, labels, _ = clips
    assert vm.class_accuracy(video, (labels + 1) % CFG.n_classes) == 0.0
    half = labels.clone()
    half[: N // 2] = (half[: N // 2] + 2) % CFG.n_classes
    assert vm.class_accuracy(video, half) == 0.5


def test_frechet_distance_is_zero_for_identical_sets_and_matches_closed_forms():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 4, generator=g) @ torch.randn(4, 4, generator=g)
    assert vm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert vm.frechet_distance(a, a + shift) == pytest.approx(5.25, rel=1e-6)  # equal covariances: |d mu|^2
    centred = a - a.mean(0)
    trace = float(torch.cov(centred.T.double()).trace())
    assert vm.frechet_distance(centred, 2 * centred) == pytest.approx(trace, rel=1e-6)  # tr(S + 4S - 2 * 2S)


def test_frechet_distance_small_between_world_samples_large_against_corrupted():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(48) % CFG.n_classes
    a, _, _ = vw.sample(48, g, label=labels)
    b, _, _ = vw.sample(48, g, label=labels)
    fa, fb = vm.physics_features(a), vm.physics_features(b)
    assert fa.shape == (48, 7 + CFG.channels)
    world = vm.frechet_distance(fa, fb)
    assert world < 0.5
    noisy = vm.physics_features(b + 0.3 * torch.randn(b.shape, generator=g))
    shuffled = vm.physics_features(b[:, :, torch.randperm(CFG.frames, generator=g)])
    assert vm.frechet_distance(fa, noisy) > 4 * world
    assert vm.frechet_distance(fa, shuffled) > 4 * world


def test_diversity_of_the_world_vs_a_collapsed_set(clips):
    video, labels, _ = clips
    world = vm.diversity(video, labels)
    assert world > 0.5
    assert vm.diversity(video) == pytest.approx(world)  # labels read back from the colours agree
    collapsed = video[labels == 0][:1].expand(4, -1, -1, -1, -1)
    assert vm.diversity(collapsed, torch.zeros(4, dtype=torch.long)) < 1e-3


def test_evaluate_video_reports_every_metric(clips):
    video, labels, _ = clips
    ref, _, _ = vw.sample(N, torch.Generator().manual_seed(9), frames=FRAMES, label=labels)
    res = vm.evaluate_video(video, labels, ref)
    assert set(res) == {"fidelity", "motion", "class_acc", "diversity", "frechet", "appearance"} | set(
        vm.physics_stats(ref)
    ) | set(vm.chunk_steps(ref, chunk_frames=2))
    assert res["appearance"] < 0.01
    assert res["fidelity"] < 1e-6 and res["motion"] < 1e-3 and res["class_acc"] == 1.0
    assert res["diversity"] > 0.5 and res["frechet"] >= 0.0
    noisy = vm.evaluate_video(
        video + 0.3 * torch.randn(video.shape, generator=torch.Generator().manual_seed(11)), labels, ref
    )
    assert noisy["fidelity"] > 0.05 and noisy["frechet"] > res["frechet"]


# --- the tinted world: an appearance only the frames carry -----------------------------------------------------

TINTED = vw.VideoWorldConfig(tint=0.9)


def test_tint_raises_only_the_off_channels_and_keeps_the_untinted_draws():
    labels = torch.arange(12) % CFG.n_classes
    plain, _, s0 = vw.sample(12, torch.Generator().manual_seed(3), config=CFG, frames=6, label=labels)
    tinted, _, s1 = vw.sample(12, torch.Generator().manual_seed(3), config=TINTED, frames=6, label=labels)
    for name in ("p0", "v", "radius", "label"):  # the tint is drawn last: motion and class are the untinted world's
        assert torch.equal(getattr(s0, name), getattr(s1, name))
    on = CFG.palette[labels] > 0
    assert torch.equal(s0.colour, CFG.palette[labels])
    assert (s1.colour[on] == 1).all()
    assert (s1.colour[~on] >= -1).all() and (s1.colour[~on] <= -1 + 0.9).all()
    assert s1.colour[~on].std() > 0.2  # per clip, not per class: clips of one class differ
    assert (s1.colour[labels == 0, 1].unique().numel()) == int((labels == 0).sum())
    m = vw.disc_mask(vw.trajectory(s1, 6), s1.radius, CFG.size)
    assert torch.allclose(tinted, -1 + m[:, None] * (s1.colour[:, :, None, None, None] + 1))
    with pytest.raises(ValueError, match="tint"):
        vw.VideoWorldConfig(tint=1.0)


def test_tinted_clips_fit_exactly_and_keep_their_class():
    video, labels, state = vw.sample(16, torch.Generator().manual_seed(4), config=TINTED, frames=10)
    fit = vm.fit_frames(video, config=TINTED)
    assert (fit.colour - state.colour[:, None]).abs().max() < 0.01  # the tint is read back per frame
    assert fit.fidelity.max() < 1e-6  # the world fit may draw any tint in range
    assert vm.class_accuracy(video, labels, config=TINTED) == 1.0
    assert vm.appearance_error(video, 2, config=TINTED).max() < 0.01
    # the untinted world's fit snaps the colour to the palette: a tinted clip is not one of its renders
    assert vm.frame_fidelity(video, config=CFG).mean() > 1e-3


def test_world_colour_clamps_off_channels_to_the_tint_range():
    colour = torch.tensor([[0.3, 0.5, -0.5], [0.9, -1.0, -0.95]])
    label = torch.tensor([0, 3])  # red (+1, -1, -1), yellow (+1, +1, -1)
    assert torch.allclose(vm.world_colour(colour, label, TINTED), torch.tensor([[1.0, -0.1, -0.5], [1.0, 1.0, -0.95]]))
    assert torch.allclose(vm.world_colour(colour, label, CFG), torch.tensor([[1.0, -1.0, -1.0], [1.0, 1.0, -1.0]]))


def test_appearance_error_is_the_colour_distance_to_the_first_chunk():
    state = vw.sample_states(4, TINTED, torch.Generator().manual_seed(5))
    video = vw.render(state, 8)
    other = vw.ClipState(state.p0, state.v, state.radius, state.label, state.colour.flip(0), state.size)
    changed = video.clone()
    changed[:, :, 4:] = vw.render(other, 8)[:, :, 4:]  # from frame 4 on, another clip's tint (same motion)
    err = vm.appearance_error(changed, 2, config=TINTED)  # [N, F - 2]
    assert err.shape == (4, 6) and err[:, :2].max() < 0.01
    expected = (state.colour - state.colour.flip(0)).norm(dim=-1)
    assert torch.allclose(err[:, 2:], expected[:, None].expand(-1, 4), atol=0.02)
    # against a reference (what a cache holds): the error of the unchanged clip is the distance to it
    assert torch.allclose(
        vm.appearance_error(video, 2, reference=changed[:, :, :2] * 0 + vw.render(other, 2), config=TINTED),
        expected[:, None].expand(-1, 6),
        atol=0.02,
    )
    with pytest.raises(ValueError, match="chunk_frames"):
        vm.appearance_error(video, 8, config=TINTED)


def test_physics_stats_of_world_clips_and_of_a_disc_stuck_at_a_wall():
    video, _, state = vw.sample(64, torch.Generator().manual_seed(6), config=CFG, frames=8)
    st = vm.physics_stats(video)
    assert st["speed"] == pytest.approx(float(state.v.norm(dim=1).mean()), abs=0.03)
    assert st["radius"] == pytest.approx(float(state.radius.mean()), abs=0.01)
    assert 0.3 < st["bounces"] < 2.0 and st["stuck"] < 0.1
    r = torch.full((2,), 2.0)
    wall = vw.ClipState(
        torch.tensor([[2.0, 7.0], [13.0, 5.0]]),
        torch.zeros(2, 2),
        r,
        torch.zeros(2).long(),
        CFG.palette[[0, 0]],
        CFG.size,
    )  # resting against the left and the right wall
    st = vm.physics_stats(vw.render(wall, 8))
    assert st["stuck"] == pytest.approx(1.0) and st["speed"] < 1e-3 and st["bounces"] == 0.0
    moving = vw.ClipState(
        torch.tensor([[8.0, 7.0]]), torch.tensor([[1.0, 0.0]]), r[:1], torch.zeros(1).long(), CFG.palette[[0]], CFG.size
    )  # right wall at 13: bounces once, at frame 5
    st = vm.physics_stats(vw.render(moving, 12))
    assert (
        st["bounces"] == pytest.approx(10 / 10) and st["stuck"] == 0.0 and st["speed"] == pytest.approx(1.0, abs=1e-2)
    )


def test_chunk_steps_tell_a_disc_that_stalls_inside_chunks_from_the_world():
    video, _, state = vw.sample(32, torch.Generator().manual_seed(6), config=CFG, frames=8)
    st = vm.chunk_steps(video, chunk_frames=2)
    speed = float(state.v.norm(dim=1).mean())
    # a median of 2-3 steps per clip: a bounce inside them moves it, hence the tolerance
    assert st["step_within"] == pytest.approx(speed, abs=0.1) and st["step_across"] == pytest.approx(speed, abs=0.1)
    # each frame shown twice: the disc holds still inside every 2-frame chunk and moves one frame's step between them
    stall = video[:, :, [0, 0, 1, 1, 2, 2, 3, 3]]
    st = vm.chunk_steps(stall, chunk_frames=2)
    assert st["step_within"] < 1e-3 and st["step_across"] == pytest.approx(speed, abs=0.05)
    # shifted by one frame the same clip jumps inside chunks: the metric reads where the chunk borders are
    st = vm.chunk_steps(video[:, :, [0, 1, 1, 2, 2, 3, 3, 4]], chunk_frames=2)
    assert st["step_across"] < 1e-3 and st["step_within"] == pytest.approx(speed, abs=0.05)
    # still at both ends of the clip, moving in between: the ends are no chunk's business and are left out
    st = vm.chunk_steps(video[:, :, [0, 0, 1, 2, 3, 4, 5, 5]], chunk_frames=2)
    assert st["step_within"] == pytest.approx(st["step_across"], abs=0.1) and st["step_within"] > 0.5
    assert set(vm.chunk_steps(video, chunk_frames=1)) == {"step_across"}  # frame-wise: no step inside a chunk
    assert set(vm.chunk_steps(video, chunk_frames=8)) == {"step_within"}  # one chunk: no step between chunks
    with pytest.raises(ValueError, match="chunk_frames"):
        vm.chunk_steps(video, chunk_frames=0)


def test_patch_grid_tv_is_noise_for_the_world_and_high_for_discs_on_the_patch_corners():
    video, _, _ = vw.sample(64, torch.Generator().manual_seed(6), config=CFG, frames=8)
    assert vm.patch_grid_tv(video, 4) < 0.12
    # every disc centred between pixels 3 and 4 (or 7 and 8, ...): on the corners of 4x4 patches
    g = torch.Generator().manual_seed(7)
    centres = 3.5 + 4 * torch.randint(0, 2, (16, 2), generator=g).float() + 0.1 * torch.randn(16, 2, generator=g)
    snapped = vw.ClipState(
        centres, torch.zeros(16, 2), torch.full((16,), 2.2), torch.zeros(16).long(), CFG.palette[[0] * 16], CFG.size
    )
    assert vm.patch_grid_tv(vw.render(snapped, 4), 4) > 0.6
    with pytest.raises(ValueError, match="patch"):
        vm.patch_grid_tv(video, 0)

"""The video world's physics and the metrics that read it back: clean clips score near perfectly, corrupted worse."""

from __future__ import annotations

import pytest
import torch

from toy import video_metrics as vm
from toy import video_world as vw

CFG = vw.VideoWorldConfig()


@pytest.fixture(scope="module")
def clips():
    torch.set_num_threads(1)
    video, labels, state = vw.sample(16, torch.Generator().manual_seed(0), config=CFG, frames=24)
    return video, labels, state


def test_sample_is_deterministic_shaped_and_in_range(clips):
    video, labels, _ = clips
    again, labels2, _ = vw.sample(16, torch.Generator().manual_seed(0), config=CFG, frames=24)
    assert torch.equal(video, again) and torch.equal(labels, labels2)
    assert video.shape == (16, 3, 24, 16, 16) and video.min() >= -1 and video.max() <= 1
    with pytest.raises(ValueError, match="even"):
        vw.VideoWorldConfig(size=15)


def test_bounces_keep_the_disc_in_the_box_and_flip_velocity(clips):
    _, _, state = clips
    track = vw.trajectory(state, 200, CFG.size)
    r = state.radius[:, None]
    assert (track >= r[..., None] - 1e-5).all() and (track <= CFG.size - 1 - r[..., None] + 1e-5).all()
    steps = track.diff(dim=1)
    flips = (steps[:, 1:].sign() != steps[:, :-1].sign()) & (steps[:, 1:].abs() > 1e-3) & (steps[:, :-1].abs() > 1e-3)
    assert flips.any()  # walls were hit
    assert torch.allclose(steps.abs().amax(1), state.v.abs(), atol=1e-4)  # speed never exceeds |v| per axis


def test_clean_clips_score_near_perfectly(clips):
    video, labels, state = clips
    fit = vm.fit_frames(video)
    assert (fit.centre - vw.trajectory(state, 24, CFG.size)).abs().max() < 0.1
    assert fit.fidelity.max() < 0.02
    assert vm.motion_coherence(video).max() < 0.2
    assert vm.class_accuracy(video, labels) == 1.0


def test_corrupted_clips_score_worse(clips):
    video, labels, _ = clips
    g = torch.Generator().manual_seed(1)
    noisy = video + 0.3 * torch.randn(video.shape, generator=g)
    assert vm.frame_fidelity(noisy).mean() > 5 * vm.frame_fidelity(video).mean()
    shuffled = video[:, :, torch.randperm(24, generator=g)]
    assert vm.motion_coherence(shuffled).mean() > 5 * vm.motion_coherence(video).mean()
    doubled = video.clone()  # from frame 12 on, a second (ghost) disc: no single disc explains the frame
    doubled[:, :, 12:] = torch.maximum(video[:, :, 12:], video[:, :, 12:].roll(shifts=(7, 7), dims=(-1, -2)))
    curve = vm.drift_curve(doubled)
    assert curve[12:].min() > 5 * curve[:12].max()
    assert vm.class_accuracy(video, (labels + 1) % CFG.n_classes) == 0.0


def test_frechet_distance_small_for_the_world_large_for_corruption():
    g = torch.Generator().manual_seed(2)
    a, _, _ = vw.sample(64, g, config=CFG)
    b, _, _ = vw.sample(64, g, config=CFG)
    fa, fb = vm.physics_features(a), vm.physics_features(b)
    assert vm.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    noisy = vm.physics_features(b + 0.3 * torch.randn(b.shape, generator=g))
    assert vm.frechet_distance(fa, noisy) > 3 * vm.frechet_distance(fa, fb)
    with pytest.raises(ValueError, match="video"):
        vm.fit_frames(torch.zeros(2, 3, 4, 8))

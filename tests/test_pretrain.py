"""Teacher flow matching and the student's ODE initialisation run through the shared loop."""

from __future__ import annotations

import pytest
import torch

from salt_ref.loop import LoopConfig, train
from salt_ref.models.wan import WanConfig, WanModel
from salt_ref.pretrain import FlowMatchingTask, ODERegressionTask, teacher_trajectories
from salt_ref.schedule import denoising_sigmas


def _tiny(causal: bool = False) -> WanModel:
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny", causal=causal, num_layers=2, chunk_frames=2))


def _batch(g: torch.Generator):
    x0 = torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1
    return x0, torch.randn(2, 8, 32, generator=g), torch.zeros(2, 8, 32)


def test_flow_matching_lowers_its_loss_on_a_fixed_batch(tmp_path):
    torch.set_num_threads(1)
    fixed = _batch(torch.Generator().manual_seed(0))
    task = FlowMatchingTask(_tiny(), lambda g: fixed, cfg_dropout=0.0)
    cfg = LoopConfig(iters=40, lr_gen=1e-3, ema_start=0, ckpt_every=40, log_every=1)
    rows = []
    train(task, cfg, tmp_path, progress=False, callback=lambda i, logs: rows.append(logs["loss_fm"]))
    assert sum(rows[-10:]) / 10 < 0.9 * sum(rows[:10]) / 10


def test_teacher_trajectories_record_the_grid_levels():
    teacher = _tiny()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 4, 8, 8, generator=g)
    ctx, null = torch.randn(2, 8, 32, generator=g), torch.zeros(2, 8, 32)
    grid = denoising_sigmas(16, 5.0)
    record = denoising_sigmas(8, 5.0)
    pairs = teacher_trajectories(teacher, noise, ctx, null, grid, record, cfg_scale=3.0)
    assert pairs.states.shape == (2, 9, 3, 4, 8, 8)
    torch.testing.assert_close(pairs.states[:, 0], noise)  # level 1.0 is the starting noise
    assert not torch.allclose(pairs.endpoint, noise)


def test_ode_regression_runs_and_needs_a_causal_student(tmp_path):
    teacher = _tiny()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(3, 3, 4, 8, 8, generator=g)
    pairs = teacher_trajectories(
        teacher,
        noise,
        torch.randn(3, 8, 32, generator=g),
        torch.zeros(3, 8, 32),
        denoising_sigmas(8, 5.0),
        denoising_sigmas(4, 5.0),
        cfg_scale=3.0,
    )
    task = ODERegressionTask(_tiny(causal=True), pairs, batch=2, chunk_frames=2)
    result = train(task, LoopConfig(iters=2, lr_gen=1e-3, ckpt_every=2), tmp_path, progress=False)
    assert result.iterations == 2 and torch.isfinite(torch.tensor(result.last_logs["loss_ode"]))
    with pytest.raises(ValueError, match="causal"):
        ODERegressionTask(_tiny(causal=False), pairs, batch=2, chunk_frames=2)

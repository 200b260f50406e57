"""Chunk-wise rollouts through the KV cache, the high-quality reference path, and the alignment loss."""

from __future__ import annotations

import pytest
import torch

from salt_ref.cache_condition import chunked_rollout, reference_exit_index
from salt_ref.feature_align import alignment_loss, token_relation_loss
from salt_ref.generate import generate, generate_without_cache
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.models.causal_flow import WanCausalFlow
from salt_ref.models.wan import WanConfig, WanModel
from salt_ref.recipe import PRESETS
from salt_ref.schedule import denoising_sigmas
from salt_ref.updates import rollout

WAN = PRESETS["wan"]
FULL = MemoryPolicy()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny", causal=True, num_layers=2, chunk_frames=2)).double()


def _inputs(model, seed: int = 1):
    """Noise ``[2, 3, 6, 8, 8]`` and the model's causal flow on a random context (full memory)."""
    g = torch.Generator().manual_seed(seed)
    noise, ctx = torch.randn(2, 3, 6, 8, 8, generator=g).double(), torch.randn(2, 8, 32, generator=g).double()
    return noise, WanCausalFlow(model, ctx, policy=FULL)


def test_reference_path_on_the_same_grid_reproduces_the_student(model):
    noise, flow = _inputs(model)
    sigmas = denoising_sigmas(2, 5.0).double()
    ro = chunked_rollout(flow, noise, sigmas, exit_index=1, mode="ddim", reference_sigmas=sigmas)
    # same chunk noise, same steps, its own cache written by identical outputs: identical results
    torch.testing.assert_close(ro.x0_ref, ro.x0.detach(), rtol=0, atol=1e-10)
    assert ro.x0.requires_grad and not ro.x0_ref.requires_grad
    assert ro.chunks == [(0, 2), (2, 4), (4, 6)]


def test_reference_path_replays_the_students_draws_and_leaves_them_alone(model):
    # re-noise sampling and a noisy context pass: every step draws noise. The reference path replays the chunk's
    # own draws, so on the student's grid it is the student exactly (x0 - x0_ref is the grid's and cache's doing,
    # not two draws'), and taking it does not move the student's own draws.
    noise, flow = _inputs(model)
    sigmas = denoising_sigmas(2, 5.0).double()

    def go(**kw):
        return chunked_rollout(flow, noise, sigmas, exit_index=1, generator=torch.Generator().manual_seed(5),
                               context_sigma=0.1, **kw)  # fmt: skip

    ro = go(reference_sigmas=sigmas)
    torch.testing.assert_close(ro.x0_ref, ro.x0.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(go().x0, ro.x0, rtol=0, atol=0)


def test_reference_path_on_the_finer_grid_differs_and_stops_at_the_exit_level(model):
    noise, flow = _inputs(model)
    coarse, fine = denoising_sigmas(2, 5.0).double(), denoising_sigmas(4, 5.0).double()
    assert reference_exit_index(fine, float(coarse[1])) == 2  # 1 -> .9375 -> .8333: 3 evaluations
    ro = chunked_rollout(flow, noise, coarse, exit_index=1, mode="ddim", reference_sigmas=fine)
    assert ro.x0_ref.shape == ro.x0.shape
    assert (ro.x0_ref - ro.x0.detach()).abs().max() > 1e-4
    with pytest.raises(ValueError, match="not on the reference grid"):
        reference_exit_index(denoising_sigmas(8, 1.0), 0.8333)


def test_only_exit_steps_carry_gradient_and_cache_is_detached(model):
    noise, flow = _inputs(model)
    ro = chunked_rollout(flow, noise, denoising_sigmas(4, 5.0).double(), exit_index=2)
    assert ro.x0.requires_grad and ro.v_exit.requires_grad
    assert all(not s.requires_grad for s in ro.states)
    ro.x0.pow(2).mean().backward()  # a detached cache: no in-place error across chunks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_on_exit_runs_per_chunk_with_that_chunks_cache(model):
    noise, flow = _inputs(model)
    seen = []

    def on_exit(flow, x, sigma, v):
        seen.append(x.shape[2])
        return flow(x, sigma)  # evaluated through the chunk's cache: equals v at the exit state

    ro = chunked_rollout(flow, noise, denoising_sigmas(2, 5.0).double(), exit_index=1, on_exit=on_exit)
    assert seen == [2, 2, 2]
    torch.testing.assert_close(ro.exit_extra, ro.v_exit.detach(), rtol=0, atol=1e-10)


def test_token_relation_loss_zero_under_margin_positive_above():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3 * 4, 8, generator=g, dtype=torch.float64)
    assert token_relation_loss(feat, feat.clone(), frames=3) == 0
    assert token_relation_loss(feat, 5.0 * feat, frames=3) == 0  # per-token scale leaves relations unchanged
    near = feat + 1e-3 * torch.randn(feat.shape, generator=g, dtype=torch.float64)
    assert token_relation_loss(feat, near, frames=3) == 0  # differences below the margin cost nothing
    far = torch.randn(feat.shape, generator=g, dtype=torch.float64)
    assert token_relation_loss(feat, far, frames=3) > 0.05
    with pytest.raises(ValueError, match="frames"):
        token_relation_loss(feat, feat, frames=5)


def test_alignment_gradient_reaches_only_the_student_output():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(3, 6).double()

    def feature_fn(x, sigma):  # [B, C, F, H, W] -> [B, F*H*W, 6]
        return net(x.flatten(2).transpose(1, 2))

    x0 = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x0_ref = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    loss = alignment_loss(feature_fn, x0, x0_ref, frames=2, shift=5.0, generator=g)
    loss.backward()
    assert loss > 0 and x0.grad.abs().sum() > 0 and x0_ref.grad is None


def test_generate_runs_past_the_trained_length_with_flat_memory():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny", causal=True, num_layers=2, chunk_frames=2, rope_max_len=8))
    ctx = torch.randn(1, 8, 32)
    video, seconds = generate(
        model,
        ctx,
        frames=16,
        size=(8, 8),
        recipe=WAN,
        memory=MemoryPolicy.parse("window:4"),
        rope="relative",
        generator=torch.Generator().manual_seed(0),
        return_times=True,
    )
    assert video.shape == (1, 3, 16, 8, 8) and torch.isfinite(video).all() and len(seconds) == 8
    with pytest.raises(ValueError, match="RoPE table"):
        generate(model, ctx, frames=16, size=(8, 8), recipe=WAN, memory=MemoryPolicy.parse("window:4"))


def test_generation_without_cache_equals_generation_through_the_cache():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny", causal=True, num_layers=2, chunk_frames=2)).double()
    ctx = torch.randn(1, 8, 32).double()
    kw = dict(frames=6, size=(8, 8), recipe=WAN)
    cached = generate(model, ctx, generator=torch.Generator().manual_seed(3), **kw)
    recomputed = generate_without_cache(model, ctx, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(cached, recomputed, rtol=1e-6, atol=1e-6)
    # the recipe decides the schedule: another shift is another video
    other = generate(model, ctx, generator=torch.Generator().manual_seed(3), **{**kw, "recipe": WAN.replace(shift=3.0)})
    assert (other - cached).abs().max() > 1e-3


def test_writer_chooses_what_a_chunk_leaves_in_the_cache(model):
    noise, flow = _inputs(model)
    two, four = denoising_sigmas(2, 5.0).double(), denoising_sigmas(4, 5.0).double()

    def rerun(grid):  # write the chunk rolled out again on ``grid``, replaying its draws
        return lambda flow_c, x0, noise_c, replay: rollout(flow_c, noise_c, grid, generator=replay, grad_exit=False).x0

    def run(writer):
        return chunked_rollout(flow, noise, two, generator=torch.Generator().manual_seed(0), writer=writer).x0

    own = run(None)
    # replaying the chunk's draws on the same grid writes exactly the chunk's output: the default
    torch.testing.assert_close(run(rerun(two)), own, rtol=0, atol=0)
    hq = run(rerun(four))
    torch.testing.assert_close(hq[:, :, :2], own[:, :, :2], rtol=0, atol=0)  # the first chunk sees an empty cache
    assert (hq[:, :, 2:] - own[:, :, 2:]).abs().max() > 1e-4

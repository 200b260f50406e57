"""The exact teacher of the video world: its flow is the mixture's, per class, and it plugs into the small setup."""

from __future__ import annotations

import pytest
import torch

from salt_ref.models.wan import WanModel
from salt_ref.recipe import PRESETS
from salt_ref.schedule import add_noise, sigma_to_t
from toy.exact_video import ExactWorldTeacher
from toy.gmm import GaussianMixture
from toy.setup_video import ClassPrompts, SmallVideoConfig, build_task, model_config, real_teacher

TINY = dict(frames=4, size=8, dim=32, layers=2, heads=2, recipe=PRESETS["small"].replace(align_block=1))


def _teacher(bank_clips: int = 64) -> tuple[ExactWorldTeacher, ClassPrompts, WanModel]:
    torch.manual_seed(0)
    cfg = SmallVideoConfig(**TINY)
    net = WanModel(model_config(cfg, causal=False))
    prompts = ClassPrompts(cfg.world_config(), net.config.text_len, net.config.text_dim)
    return ExactWorldTeacher(cfg.world_config(), net, prompts, bank_clips=bank_clips, seed=3), prompts, net


def test_flow_is_the_gaussian_mixture_flow_of_the_class_bank():
    teacher, prompts, _ = _teacher()
    x = torch.randn(6, *teacher.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, -1, -1])
    ctx = torch.cat([prompts.embed(labels[:4]), prompts.null(2)])
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.8, 0.4])
    v = teacher(x, sigma_to_t(sigma), ctx)
    for i, c in enumerate(labels.tolist()):
        bank = teacher.bank if c < 0 else teacher.bank[teacher.labels == c]
        # toy.gmm's exact flow with (nearly) zero-width components at the class's bank clips
        mixture = GaussianMixture(bank.double(), torch.full((len(bank),), 1e-6), torch.ones(len(bank)))
        want = mixture.flow(x[i : i + 1].flatten(1).double(), sigma[i : i + 1].double())
        torch.testing.assert_close(v[i].flatten().double(), want[0], rtol=1e-4, atol=1e-4)


def test_low_noise_denoises_to_the_nearest_clip_of_the_prompts_class():
    teacher, prompts, _ = _teacher()
    k = int((teacher.labels == 2).nonzero()[0])
    clip = teacher.bank[k].view(1, *teacher.shape)
    x = add_noise(clip, torch.randn(clip.shape, generator=torch.Generator().manual_seed(2)), 0.05)
    x0 = teacher.denoise(x, torch.tensor([0.05]), torch.tensor([2]))
    torch.testing.assert_close(x0, clip)
    other = teacher.denoise(x, torch.tensor([0.05]), torch.tensor([1]))  # another class: one of that class's clips
    assert any(torch.equal(other.flatten(), b) for b in teacher.bank[teacher.labels == 1])


def test_features_come_from_the_network_and_bad_inputs_are_refused():
    teacher, prompts, net = _teacher()
    x, ctx = torch.randn(2, *teacher.shape), prompts.embed(torch.tensor([0, 3]))
    t = sigma_to_t(torch.tensor([0.1, 0.2]))
    got = teacher(x, t, ctx, features=(1,), features_only=True)[1]
    torch.testing.assert_close(got, net(x, t, ctx, features=(1,), features_only=True)[1])
    with pytest.raises(ValueError, match="neither a class embedding"):
        teacher(x, t, torch.randn_like(ctx))
    with pytest.raises(ValueError, match="sigma > 0"):
        teacher(x, torch.zeros(2), ctx)
    with pytest.raises(ValueError, match="per-frame levels"):
        teacher(x, torch.tensor([[100.0, 200.0, 100.0, 100.0]] * 2), ctx)
    with pytest.raises(ValueError, match="x must be"):
        teacher(torch.randn(2, 3, 4, 6, 6), t, ctx)


def test_small_setup_reads_the_teacher_setting():
    with pytest.raises(ValueError, match="unknown teacher 'oracle'"):
        SmallVideoConfig(teacher="oracle")
    net_cfg, exact_cfg = SmallVideoConfig(**TINY), SmallVideoConfig(**TINY, teacher="exact")
    assert "teacher" not in net_cfg.to_dict()  # runs from before the setting keep their fingerprints
    assert SmallVideoConfig.from_dict(exact_cfg.to_dict()).teacher == "exact"
    assert net_cfg.init_key() != exact_cfg.init_key()  # the ODE init is the exact teacher's own
    assert net_cfg.teacher_key() == exact_cfg.teacher_key()  # the network (critic start, features) is shared
    torch.manual_seed(0)
    net = WanModel(model_config(exact_cfg, causal=False))
    assert real_teacher(net_cfg, net) is net
    task = build_task(exact_cfg, net, WanModel(model_config(exact_cfg, causal=True)))
    assert isinstance(task.teacher, ExactWorldTeacher) and task.teacher.network is net


def test_ode_init_follows_the_exact_teachers_trajectories(tmp_path, monkeypatch):
    import toy.setup_video as sv

    seen = []

    def spy(teacher, *args, **kwargs):
        seen.append(teacher)
        raise RuntimeError("stop after the trajectories' teacher is known")

    monkeypatch.setattr(sv, "teacher_trajectories", spy)
    cfg = SmallVideoConfig(**TINY, teacher="exact", ode_pairs=8)
    torch.manual_seed(0)
    net = WanModel(model_config(cfg, causal=False))
    with pytest.raises(RuntimeError, match="stop after"):
        sv.get_student_init(cfg, net, tmp_path, progress=False)
    assert isinstance(seen[0], ExactWorldTeacher) and seen[0].network is net


def test_bench_video_teacher_flag_reaches_every_run_and_only_when_given():
    from toy.bench_video import build_parser, overrides_of

    default = overrides_of(build_parser().parse_args([]))
    assert "teacher" not in default  # the preset's network teacher: its runs and caches keep their keys
    exact = SmallVideoConfig(**overrides_of(build_parser().parse_args(["--teacher", "exact"])))
    assert exact.teacher == "exact" and exact.init_key() != SmallVideoConfig(**default).init_key()


def test_train_cli_teacher_and_batch_flags_reach_the_small_config(tmp_path, monkeypatch):
    import toy.run_video
    from salt_ref.train import main

    seen = []

    def spy(cfg, *args, **kwargs):
        seen.append(cfg)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(toy.run_video, "run", spy)
    for flags, want, batch in (([], "network", 4), (["--teacher", "exact", "--batch", "8"], "exact", 8)):
        with pytest.raises(RuntimeError, match="stop before training"):
            main(["--scale", "small", "--out", str(tmp_path / want), "--no-progress", *flags])
        assert (seen[-1].teacher, seen[-1].batch) == (want, batch)


def test_small_batch_reaches_the_task_and_only_the_runs_key():
    from salt_ref.train import main

    cfg = SmallVideoConfig(**TINY, batch=8)
    assert cfg.to_dict()["batch"] == 8 and "batch" not in SmallVideoConfig(**TINY).to_dict()
    assert cfg.init_key() == SmallVideoConfig(**TINY).init_key()  # the ODE init does not depend on it
    torch.manual_seed(0)
    task = build_task(cfg, WanModel(model_config(cfg, causal=False)), WanModel(model_config(cfg, causal=True)))
    assert task.cfg.batch == 8
    with pytest.raises(ValueError, match="batch must be >= 1"):
        SmallVideoConfig(batch=0)
    assert main(["--scale", "small", "--batch", "0"]) == 2


def test_sweep_video_teacher_flag_reaches_every_cell():
    from toy.sweep_video import cell_config

    base, _ = cell_config("base", None, 0, tiny=True)
    cfg, _ = cell_config("chunk_frames", 8, 0, tiny=True, teacher="exact")
    assert (base.teacher, cfg.teacher, cfg.chunk_frames) == ("network", "exact", 8)


def test_sweep_video_runs_its_cells_under_the_exact_teacher(tmp_path, monkeypatch):
    import json

    from toy.sweep_video import main

    monkeypatch.chdir(tmp_path)  # the tiny teacher and inits go to tmp_path/runs/cache
    assert main(["--tiny", "--knobs", "iters", "--workers", "1", "--out", "sv", "--teacher", "exact"]) == 0
    assert json.loads((tmp_path / "sv" / "base-s0" / "config.json").read_text())["teacher"] == "exact"
    assert "self-forcing, exact teacher" in (tmp_path / "sv" / "sweep.md").read_text()

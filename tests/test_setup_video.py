"""The small video setup: one iteration of each method through the shared loop, and the CLI's input checks."""

from __future__ import annotations

import pytest
import torch

from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import LoopConfig, train
from salt_ref.models.wan import WanModel
from salt_ref.recipe import PRESETS
from salt_ref.train import main
from toy.run_video import evaluate_student
from toy.setup_video import SmallVideoConfig, build_task, model_config

RECIPE = PRESETS["small"].replace(align_start=0, align_block=1)
TINY = dict(frames=4, size=8, dim=32, layers=2, heads=2, recipe=RECIPE)


@pytest.mark.parametrize("method", ["self-forcing", "sc-dmd", "salt"])
def test_one_iteration_of_each_method(method, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = TINY
    if method == "salt":  # force 2-step draws so the reference path and the alignment run
        tiny = {**TINY, "recipe": RECIPE.replace(steps=(2,), step_probs=(1.0,))}
    cfg = SmallVideoConfig(method=method, **tiny)
    task = build_task(cfg, WanModel(model_config(cfg, causal=False)), WanModel(model_config(cfg, causal=True)))
    seen: list[dict] = []
    loop = LoopConfig(
        iters=3 if method == "salt" else 1, critic_ratio=1, lr_gen=1e-4, lr_critic=1e-4, ckpt_every=5, seed=0
    )
    train(task, loop, tmp_path, progress=False, callback=lambda i, logs: seen.append(dict(logs)))
    assert all(torch.isfinite(torch.tensor(v)) for logs in seen for v in logs.values())
    keys = set().union(*seen)
    assert {"loss_dmd", "loss_critic"} <= keys
    if method == "self-forcing":
        assert all(logs["n_steps"] == 4 for logs in seen)
    if method == "salt":
        assert "loss_align" in keys


def test_evaluation_reports_every_horizon():
    torch.manual_seed(0)
    cfg = SmallVideoConfig(**TINY)
    metrics, videos, drift = evaluate_student(
        WanModel(model_config(cfg, causal=True)),
        cfg,
        n_per_class=1,
        memory=MemoryPolicy.parse("window:2"),
        rope="relative",
    )
    assert set(metrics) == {"1x", "2x", "4x"} and videos[4].shape[2] == 16 and drift.shape == (16,)
    assert {"fidelity", "motion", "class_acc", "diversity", "frechet"} <= set(metrics["1x"])


def test_small_scale_bad_memory_policy_is_one_line_exit_2(capsys, tmp_path):
    assert main(["--scale", "small", "--memory", "ring:3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot parse memory policy" in err[0]


def test_cache_quality_gap_vanishes_when_both_caches_are_written_alike():
    from toy.run_video import cache_quality_gap

    torch.manual_seed(0)
    cfg = SmallVideoConfig(**TINY)
    student = WanModel(model_config(cfg, causal=True))
    res = cache_quality_gap(student, cfg, n_per_class=1)
    assert {"lq_fidelity", "hq_fidelity", "gap_fidelity"} <= set(res)
    alike = SmallVideoConfig(**{**TINY, "recipe": RECIPE.replace(align_reference_steps=2)})
    same = cache_quality_gap(student, alike, n_per_class=1)  # the "HQ" cache is written by 2 steps too
    assert abs(same["gap_fidelity"]) < 1e-6 and abs(same["lq_motion"] - same["hq_motion"]) < 1e-6
    assert abs(same["gap_appearance"]) < 1e-6  # the tint drift is read against the same written first chunk
    assert abs(res["gap_fidelity"]) > 1e-6  # 4-step writers make a different cache
    assert res["gap_appearance"] == pytest.approx(res["lq_appearance"] - res["hq_appearance"])


def test_alignment_probe_floor_is_the_probe_when_the_reference_grid_is_the_students():
    from toy.run_video import alignment_probe

    torch.manual_seed(0)
    cfg = SmallVideoConfig(**TINY)
    teacher, student = WanModel(model_config(cfg, causal=False)), WanModel(model_config(cfg, causal=True))
    res = alignment_probe(student, teacher, cfg, batches=1, batch=2)
    assert set(res) == {f"{k}{s}" for k in ("loss_align", "ref_mse", "frac_over") for s in ("", "_floor")}
    # the reference path replays the student's draws: on the student's own grid it is the student (floor 0), on
    # the 4-step grid it is not
    assert res["ref_mse"] > 0 and res["loss_align"] > 0
    assert res["ref_mse_floor"] == 0 and res["loss_align_floor"] == 0 and res["frac_over_floor"] == 0
    alike = SmallVideoConfig(**{**TINY, "recipe": RECIPE.replace(align_reference_steps=2)})
    same = alignment_probe(student, teacher, alike, batches=1, batch=2)  # the reference grid is the student's
    for k in ("loss_align", "ref_mse", "frac_over"):
        assert same[k] == pytest.approx(same[k + "_floor"], abs=1e-7)
        assert same[k + "_floor"] == pytest.approx(res[k + "_floor"], abs=1e-7)


def test_bench_table_has_a_row_per_method_memory_horizon_and_gap():
    from toy.bench_video import LOOK, MEMORIES, gap_table, look_table, make_table

    keys = ("fidelity", "motion", "class_acc", "frechet", "appearance", *LOOK, *(f"world_{k}" for k in LOOK))
    metrics = {h: dict.fromkeys(keys, 0.5) for h in ("1x", "2x", "4x")}
    gap = {"lq_fidelity": 0.3, "hq_fidelity": 0.1, "gap_fidelity": 0.2}
    gap |= {"lq_appearance": 0.25, "hq_appearance": 0.05, "gap_appearance": 0.2}
    run = {"memory": {m: {"metrics": metrics, "drift": [0.1]} for m in MEMORIES}, "gap": {}}
    run["gap"] = {m: {"1x": gap, "4x": gap} for m in MEMORIES}
    results = {"salt": [run, run], "ode-init": [run]}
    table = make_table(results)
    rows = [r for r in table.splitlines() if r.startswith("| salt |") or r.startswith("| ode-init |")]
    assert len(rows) == 2 * len(MEMORIES) * 3
    gaps = gap_table(results)
    assert "| salt | full | 4x | 0.2500 | 0.0500 | +0.2000 ± 0.0000 | – | +0.2000 ± 0.0000 |" in gaps
    assert len([r for r in gaps.splitlines() if r.startswith("| salt |")]) == 2 * len(MEMORIES)
    look = look_table(results)
    assert "| world | 1x | 0.500 | 0.500 | 0.500 | 0.500 |" in look


def test_bench_video_cfg_scale_reaches_every_runs_recipe():
    # the flag lands in the one recipe every job is built from, tiny sizes included; the default is the preset's
    from salt_ref.recipe import PRESETS
    from toy.bench_video import build_parser, overrides_of
    from toy.setup_video import SmallVideoConfig

    default = SmallVideoConfig(**overrides_of(build_parser().parse_args([])))
    assert default.recipe == SmallVideoConfig().recipe
    for flags in (["--cfg-scale", "1"], ["--cfg-scale", "1", "--tiny"]):
        cfg = SmallVideoConfig(**overrides_of(build_parser().parse_args(flags)))
        assert cfg.recipe.cfg_scale == 1.0
        assert cfg.recipe.align_block == (1 if "--tiny" in flags else PRESETS["small"].align_block)
        assert cfg.init_key() != default.init_key() and cfg.teacher_key() == (
            SmallVideoConfig(**overrides_of(build_parser().parse_args(flags[2:]))).teacher_key()
        )


def test_sweep_video_base_is_the_small_preset_and_its_loop():
    # BASE is written out so the table can be re-run; it must still be what `--scale small` trains
    from salt_ref.recipe import PRESETS
    from toy.setup_video import SmallVideoConfig, distill_loop
    from toy.sweep_video import cell_config

    cfg, loop = cell_config("base", None, 0, tiny=False)
    assert cfg.recipe == SmallVideoConfig(method="self-forcing").recipe == PRESETS["small"].for_method("self-forcing")
    assert loop == distill_loop(150, 0)
    assert cfg.chunk_frames == SmallVideoConfig.chunk_frames and cfg.patch == SmallVideoConfig.patch
    moved, _ = cell_config("shift", 1.0, 0, tiny=False)
    assert moved.recipe == cfg.recipe.replace(shift=1.0) and moved.init_key() != cfg.init_key()
    _, beta = cell_config("beta1", 0.9, 0, tiny=False)
    assert beta.betas == (0.9, loop.betas[1])


def test_sweep_video_tiny_table_and_read_back(tmp_path, monkeypatch, capsys):
    from toy.sweep_video import main

    monkeypatch.chdir(tmp_path)  # the tiny teacher and inits go to tmp_path/runs/cache
    argv = ["--tiny", "--knobs", "chunk_frames", "--workers", "1", "--out", "sv"]
    assert main(argv) == 0
    table = (tmp_path / "sv" / "sweep.md").read_text()
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): r for r in table.splitlines() if r.startswith("| ")}
    assert {("world", "–"), ("base", "base"), ("chunk_frames", "1"), ("chunk_frames", "4")} <= set(rows)
    step_cols = lambda r: [c.strip() for c in r.split("|")[5:7]]  # noqa: E731 - inside / into a chunk
    assert step_cols(rows[("chunk_frames", "1")])[0] == "–" != step_cols(rows[("chunk_frames", "1")])[1]
    assert step_cols(rows[("chunk_frames", "4")])[1] == "–" != step_cols(rows[("chunk_frames", "4")])[0]  # 4 frames
    assert float(rows[("base", "base")].split("|")[-2]) >= 0.0  # the patch-grid TV of every run and of the world
    assert float(rows[("world", "–")].split("|")[-2]) >= 0.0
    assert "4 runs (4 trained, 0 evaluated, 0 read back" in table
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 runs (0 trained, 0 evaluated, 4 read back" in (tmp_path / "sv" / "sweep.md").read_text()
    (tmp_path / "sv" / "chunk_frames=4-s0" / "final_metrics.json").unlink()  # a finished checkpoint alone
    assert main(argv) == 0
    assert "4 runs (0 trained, 1 evaluated, 3 read back" in (tmp_path / "sv" / "sweep.md").read_text()


def test_teacher_shift_trains_the_teacher_and_keys_its_cache(tmp_path, monkeypatch):
    """The teacher's training shift reaches its flow-matching task; at its default the cache key is the old one."""
    import toy.setup_video as sv

    default = SmallVideoConfig(**TINY, teacher_iters=1)
    assert SmallVideoConfig(**TINY, teacher_iters=1, teacher_shift=1.0).teacher_key() == default.teacher_key()
    shifted = SmallVideoConfig(**TINY, teacher_iters=1, teacher_shift=3.0)
    assert shifted.teacher_key() != default.teacher_key()
    seen: list[float] = []

    class Spy(sv.FlowMatchingTask):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.shift)

    monkeypatch.setattr(sv, "FlowMatchingTask", Spy)
    sv.get_teacher(shifted, tmp_path, progress=False)
    assert seen == [3.0] and (tmp_path / f"teacher-{shifted.teacher_key()}").is_dir()
    with pytest.raises(ValueError, match="teacher_shift must be positive"):
        SmallVideoConfig(teacher_shift=0.0)


def test_bench_video_teacher_iters_reaches_the_shared_teacher():
    # the flag changes the teacher every job shares (so its key and the init's), and only when given
    from toy.bench_video import build_parser, overrides_of
    from toy.setup_video import SmallVideoConfig

    for tiny in ([], ["--tiny"]):
        default = SmallVideoConfig(**overrides_of(build_parser().parse_args(tiny)))
        assert default.teacher_iters == (2 if tiny else SmallVideoConfig.teacher_iters)
        cfg = SmallVideoConfig(**overrides_of(build_parser().parse_args([*tiny, "--teacher-iters", "12000"])))
        assert cfg.teacher_iters == 12000 and cfg.teacher_key() != default.teacher_key()
        assert cfg.recipe == default.recipe

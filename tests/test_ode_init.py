"""``python -m salt_ref.ode_init``: teacher pairs to files (resumable, seeded per row) and the causal student's
ODE regression through the shared loop, at the tiny config on the CPU with the GPU defaults (bf16 autocast,
activation checkpointing)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_wan import write_run_inputs

from salt_ref.checkpoint import load_state, read_header
from salt_ref.loop import Rng
from salt_ref.models.wan import WanConfig, WanModel, load_checkpoint
from salt_ref.ode_init import PairsDir, main
from salt_ref.pretrain import ODERegressionTask, teacher_trajectories
from salt_ref.recipe import PRESETS
from salt_ref.video_task import EmbeddingPrompts

LATENT = (3, 4, 8, 8)
SEED = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_run_inputs(tmp_path_factory.mktemp("ode_init"), ("teacher", "student"))


def _pairs_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pairs", "--teacher", str(root / "teacher.safetensors"), "--prompts", str(root / "prompts.safetensors"),
        "--out", str(out), "--model", "tiny", "--latent", "x".join(map(str, LATENT)), "--n", "3",
        "--grid-steps", "8", "--record-steps", "4", "--seed", str(SEED), "--no-progress", *extra,
    ]  # fmt: skip


def _train_args(student: Path, pairs: Path, out: Path, iters: int, *extra: str) -> list[str]:
    return [
        "train", "--student", str(student), "--pairs", str(pairs), "--out", str(out),
        "--model", "tiny", "--chunk-frames", "2", "--iters", str(iters), "--batch-per-gpu", "2", "--ckpt-every", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_dir(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    assert main(_pairs_args(files, out)) == 0
    return out


def _direct_endpoint(root: Path, row: int) -> torch.Tensor:
    """Row ``row``'s trajectory from teacher_trajectories itself: bf16 teacher under bf16 autocast (the defaults),
    noise by the documented rule (a CPU generator seeded seed * 2^32 + row)."""
    teacher = WanModel(WanConfig.preset("tiny")).to(torch.bfloat16)
    load_checkpoint(teacher, root / "teacher.safetensors")
    prompts = EmbeddingPrompts(str(root / "prompts.safetensors"))
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED * 2**32 + row))[None]
    wan = PRESETS["wan"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj = teacher_trajectories(
            teacher,
            noise,
            prompts.rows(torch.tensor([row])),
            prompts.negative[None],
            wan.sigmas(8),
            wan.sigmas(4),
            cfg_scale=wan.cfg_scale,
        )
    return traj.states[0, -1]


def test_pairs_writes_one_file_per_row_equal_to_the_teacher_trajectory(files, pairs_dir):
    assert sorted(p.name for p in pairs_dir.iterdir()) == [f"pair_{i:06d}.safetensors" for i in range(3)]
    levels = PRESETS["wan"].sigmas(4)
    endpoints = []
    for i in range(3):
        t = load_file(pairs_dir / f"pair_{i:06d}.safetensors")
        assert t["states"].shape == (5, *LATENT) and t["states"].dtype == torch.bfloat16
        assert t["context"].shape == (8, 32)
        assert torch.equal(t["levels"], levels)
        assert read_header(pairs_dir / f"pair_{i:06d}.safetensors")["row"] == i
        endpoints.append(t["states"][-1])
    assert not torch.equal(endpoints[0], endpoints[2])  # each row its own noise and prompt
    direct = _direct_endpoint(files, 1)
    torch.testing.assert_close(endpoints[1].float(), direct.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_a_rerun_makes_only_the_missing_row_and_the_same_one(files, pairs_dir, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(pairs_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    old = load_file(out / "pair_000001.safetensors")
    (out / "pair_000001.safetensors").unlink()
    assert main(_pairs_args(files, out)) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after.keys() == before.keys()  # no temporary file left behind
    assert {k for k in after if after[k] != before[k]} == {"pair_000001.safetensors"}
    new = load_file(out / "pair_000001.safetensors")
    assert all(torch.equal(new[k], old[k]) for k in ("states", "levels", "context"))


def test_lazy_pairs_read_the_files_and_train_like_pairs_in_memory(files, pairs_dir):
    lazy = PairsDir(pairs_dir)
    assert lazy.states.shape == (3, 5, *LATENT) and lazy.context.shape == (3, 8, 32)
    idx = torch.tensor([2, 0])
    t2 = load_file(pairs_dir / "pair_000002.safetensors")
    assert torch.equal(lazy.states[idx][0], t2["states"].float())
    assert torch.equal(lazy.endpoint[idx][0], t2["states"][-1].float())
    assert torch.equal(lazy.context[idx][0], t2["context"].float())
    student = WanModel(WanConfig.preset("tiny", causal=True))
    losses = []
    for pairs in (lazy, lazy.to_pairs()):
        task = ODERegressionTask(student, pairs, batch=2, chunk_frames=2)
        rng = Rng(torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        losses.append(task.generator_loss(0, rng, student)[0].item())
    assert losses[0] == losses[1]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_regresses_through_the_loop_and_resumes(files, pairs_dir, tmp_path, capsys):
    student = tmp_path / "student.safetensors"
    shutil.copy(files / "student.safetensors", student)
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(_train_args(student, pairs_dir, run, 2)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(run) and summary["iterations"] == 2 and math.isfinite(summary["last"]["loss_ode"])
    rows = _rows(run)
    assert [r["iter"] for r in rows] == [1, 2] and all(math.isfinite(r["loss_ode"]) for r in rows)
    assert read_header(run / "checkpoint.safetensors")["iteration"] == 2
    assert main(_train_args(student, pairs_dir, ref, 3)) == 0  # uninterrupted, from the same init
    # another init under the same name: only the checkpoint can make the resumed run end like the reference
    shutil.copy(files / "teacher.safetensors", student)
    assert main(_train_args(student, pairs_dir, run, 3, "--resume")) == 0
    assert [r["iter"] for r in _rows(run)] == [1, 2, 3]
    resumed, straight = load_state(run / "checkpoint.safetensors")[0], load_state(ref / "checkpoint.safetensors")[0]
    init = load_file(files / "student.safetensors")
    assert not torch.equal(resumed["generator.head.head.weight"], init["head.head.weight"])  # it trained
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight if k.startswith(("generator.", "opt_gen.")))


@pytest.mark.parametrize(
    "case, needle",
    [
        ("off-grid", "not on the --grid-steps 6 grid"),
        ("latent", "--latent must be CxFxHxW"),
        ("teacher", "--teacher: no file at"),
        ("empty", "holds no pair files"),
        ("shapes", "has other shapes than pair_000000.safetensors"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(files, pairs_dir, tmp_path, capsys, case, needle):
    if case == "off-grid":  # 4-step levels are not points of a 6-step grid
        argv = _pairs_args(files, tmp_path / "p") + ["--grid-steps", "6"]
    elif case == "latent":
        argv = _pairs_args(files, tmp_path / "p") + ["--latent", "3x4x8"]
    elif case == "teacher":
        argv = _pairs_args(files, tmp_path / "p") + ["--teacher", str(tmp_path / "nope.safetensors")]
    else:
        pairs = tmp_path / "pairs"
        pairs.mkdir()
        if case == "shapes":
            shutil.copy(pairs_dir / "pair_000000.safetensors", pairs)
            t = load_file(pairs_dir / "pair_000001.safetensors")
            save_file({**t, "states": t["states"][:, :, :2].contiguous()}, pairs / "pair_000001.safetensors")
        argv = _train_args(files / "student.safetensors", pairs, tmp_path / "run", 1)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err

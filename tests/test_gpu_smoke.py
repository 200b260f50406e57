"""``scripts/gpu_smoke.py``: its ``--tiny`` run on the CPU, its refusal without CUDA, and its failure handling.

The script's real sizes need one H100/H200; here every section runs at the tiny preset (the training section
through ``torchrun`` with gloo), which proves the script's code paths and its JSON layout, not the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_tiny_run_reports_every_section_ok(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(run.stdout) == report  # the same JSON is printed
    assert report["mode"] == "tiny" and report["ok"] is True and _number(report["seconds"])
    names = ["env", "train_tiny", "generate_1p3b", "cfg_forward_14b"]
    assert report["sections_planned"] == names and list(report["sections"]) == names
    for name, sec in report["sections"].items():
        assert sec["ok"] is True and "error" not in sec, (name, sec.get("error"))
        assert _number(sec["seconds"]), name

    env = report["sections"]["env"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] == torch.cuda.is_available()

    train = report["sections"]["train_tiny"]
    assert train["returncode"] == 0 and train["iterations"] == 3 and train["loss_align_seen"] is True
    assert train["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert [row["iter"] for row in train["losses"]] == [1, 2, 3]
    assert all(_number(row["loss_dmd"]) and _number(row["loss_critic"]) for row in train["losses"])
    assert train["final"]["iterations"] == 3 and _number(train["wall_seconds"])

    gen = report["sections"]["generate_1p3b"]
    assert gen["model"] == "tiny" and gen["sdpa"]["probe"]["MATH"] == "ok"
    assert gen["sdpa"]["probe_first_ok"] in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    assert gen["sdpa"]["ran"] and gen["sdpa"]["model_ops"]  # the model's own attention was seen
    full = gen["full_memory"]
    assert full["chunks"] == 2 and len(full["chunk_seconds"]) == 2 and full["video_frames"] == 13
    for key in ("total_seconds", "latent_fps", "video_fps"):
        assert _number(full[key]) and full[key] > 0, key
    long = gen["sink_window_relative"]
    assert long["memory"] == "sink:1+window:4" and long["rope"] == "relative" and long["latent_frames"] == 12
    assert long["chunks"] == 6 and len(long["steady_chunk_seconds"]) == 3
    assert _number(long["steady_ratio"]) and isinstance(long["flat"], bool)

    cfg = report["sections"]["cfg_forward_14b"]
    assert cfg["model"] == "tiny" and cfg["output_shape"] == [2, 3, 4, 8, 8] and _number(cfg["forward_seconds"])
    assert any(line.startswith("teacher CFG forward") for line in cfg["plan_lines"])
    assert _number(cfg["plan_teacher_transient_gib"]) and cfg["plan_teacher_transient_gib"] > 0
    if not torch.cuda.is_available():
        assert gen["full_memory"]["peak_memory_gib"] is None and cfg["peak_memory_gib"] is None


def test_without_cuda_and_without_tiny_is_one_line_and_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without a GPU")
    out = tmp_path / "smoke.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and "CUDA GPU" in lines[0] and "--tiny" in lines[0]
    assert not out.exists()


def test_unknown_section_is_refused(smoke, capsys):
    assert smoke.main(["--tiny", "--sections", "train_tiny,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_a_failing_section_is_recorded_and_the_next_still_runs(smoke):
    ctx = smoke.Context(tiny=True)

    def fails(rec, ctx):
        rec["measured"] = 1.5
        time.sleep(0.01)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    bad = smoke.run_section("bad", fails, ctx)
    assert bad["ok"] is False and bad["measured"] == 1.5 and bad["seconds"] >= 0.01
    assert bad["error"].startswith("OutOfMemoryError: CUDA out of memory") and "fails" in bad["traceback"]
    good = smoke.run_section("good", lambda rec, ctx: rec.update(value=2), ctx)
    assert good["ok"] is True and good["value"] == 2 and "error" not in good

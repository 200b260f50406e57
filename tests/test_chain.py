"""The full-scale chain from the official downloads to a video, end to end on tiny random models (CPU).

text file -> ``salt_ref.encode_prompts`` (umT5) -> ``salt_ref.ode_init pairs`` (teacher ODE trajectories) ->
``salt_ref.ode_init train`` (ODE-regression init) -> ``salt_ref.train --scale full`` (2 Salt iterations, FSDP2 on
2 gloo processes) -> ``salt_ref.convert export`` (the EMA student) -> ``salt_ref.sample --scale full`` (KV-cache
generation, Wan VAE decode) -> an mp4 with the expected frame count. The Wan folder holds tiny stand-ins in the
official layouts (``tests/tiny_wan.py``); each command is the one a user runs, with the flags documented in
``docs/full_scale.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from tiny_wan import write_dit, write_umt5, write_vae

from salt_ref.sample import main as sample_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FRAMES, SIZE = 13, "64x64"  # 13 = 4 x (4 latent frames - 1) + 1 video frames; 64 px = 8 latent px x 8


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("Wan2.1-T2V-tiny")
    write_umt5(root)
    write_vae(root)
    write_dit(root / "teacher.safetensors", seed=2)
    write_dit(root / "critic.safetensors", seed=1)
    write_dit(root / "init.safetensors", seed=0)
    return root


def _sample(wan_dir: Path, student: Path, out: Path, *extra: str) -> dict:
    args = [
        "--scale", "full", "--model", "tiny", "--chunk-frames", "2", "--student", str(student),
        "--wan-dir", str(wan_dir), "--t5-config", str(wan_dir / "config.json"),
        "--vae-config", str(wan_dir / "vae_config.json"), "--prompt", "a red fox runs over the hill",
        "--frames", str(FRAMES), "--size", SIZE, "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "salt_ref.sample", *args], capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_sample_full_writes_an_mp4_with_the_expected_frames(wan_dir, tmp_path):
    report = _sample(wan_dir, wan_dir / "init.safetensors", tmp_path / "video.mp4")
    frames = iio.imread(tmp_path / "video.mp4")
    assert frames.shape == (FRAMES, 64, 64, 3)
    assert report["frames"] == FRAMES and report["latent_frames"] == 4 and len(report["chunk_seconds"]) == 2
    # past the trained length with a bounded policy and relative RoPE: 4x the frames, flat memory
    long = _sample(wan_dir, wan_dir / "init.safetensors", tmp_path / "long.mp4", "--frames", "49",
                   "--memory", "sink:1+window:3", "--rope", "relative")  # fmt: skip
    assert long["latent_frames"] == 13 and iio.imread(tmp_path / "long.mp4").shape[0] == 49


def test_sample_full_bad_input_is_one_line_and_exit_2(wan_dir, tmp_path, capsys):
    base = ["--scale", "full", "--model", "tiny", "--student", str(wan_dir / "init.safetensors"),
            "--wan-dir", str(wan_dir), "--prompt", "a fox", "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    assert sample_main([*base, "--frames", "12"]) == 2
    assert sample_main([*base, "--student", str(tmp_path / "missing.safetensors")]) == 2
    assert sample_main([*base, "--memory", "ring:3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 3 and all(line.startswith("error:") for line in err), err
    assert "4n + 1" in err[0] and "missing.safetensors" in err[1] and "memory" in err[2]


def _run(module: str, *args: str, procs: int = 0) -> str:
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs else [sys.executable]
    )
    run = subprocess.run([*launch, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, f"{module} {args[:2]}: {run.stderr[-3000:]}"
    return run.stdout


def test_the_chain_from_a_text_file_to_an_mp4(wan_dir, tmp_path):
    t = tmp_path
    (t / "prompts.txt").write_text("a red fox runs over the hill\nblue cat sleeps on warm stone\nan old tree\n")
    _run("salt_ref.encode_prompts", "--wan-dir", str(wan_dir), "--prompts", str(t / "prompts.txt"),
         "--out", str(t / "prompts.safetensors"), "--device", "cpu", "--dtype", "fp32", "--quiet")  # fmt: skip
    tiny = ["--model", "tiny", "--latent", "3x4x8x8"]
    _run("salt_ref.ode_init", "pairs", "--teacher", str(wan_dir / "teacher.safetensors"), *tiny,
         "--prompts", str(t / "prompts.safetensors"), "--out", str(t / "pairs"), "--grid-steps", "8",
         "--record-steps", "4", "--device", "cpu", "--no-progress")  # fmt: skip
    assert len(list((t / "pairs").glob("pair_*.safetensors"))) == 3
    _run("salt_ref.ode_init", "train", "--student", str(wan_dir / "init.safetensors"), "--model", "tiny",
         "--chunk-frames", "2", "--pairs", str(t / "pairs"), "--out", str(t / "ode"), "--iters", "2",
         "--total-batch", "2", "--no-progress")  # fmt: skip
    _run("salt_ref.convert", "export", str(t / "ode"), "--which", "generator", "--model", "tiny",
         "--out", str(t / "ode_init.safetensors"))  # fmt: skip
    _run("salt_ref.train", "--scale", "full", "--model", "tiny", "--teacher-model", "tiny",
         "--student", str(t / "ode_init.safetensors"), "--critic", str(wan_dir / "critic.safetensors"),
         "--teacher", str(wan_dir / "teacher.safetensors"), "--prompts", str(t / "prompts.safetensors"),
         "--latent", "3x4x8x8", "--chunk-frames", "2", "--align-block", "2", "--align-start", "0",
         "--memory", "window:2", "--total-batch", "2", "--critic-ratio", "1", "--iters", "2",
         "--no-progress", "--out", str(t / "salt"), procs=2)  # fmt: skip
    _run("salt_ref.convert", "export", str(t / "salt"), "--out", str(t / "student_ema.safetensors"))
    report = _sample(wan_dir, t / "student_ema.safetensors", t / "video.mp4", "--memory", "window:2")
    assert report["frames"] == FRAMES and iio.imread(t / "video.mp4").shape == (FRAMES, 64, 64, 3)

"""The full-scale trainer: plan, refusal without CUDA, and its FSDP2 code path at the tiny config on the CPU.

The 2-process run goes through ``torchrun`` with the gloo backend: FSDP2 sharding, sharded loading of
official-layout checkpoints, per-rank random streams, sharded ``torch.distributed.checkpoint`` saves and resume.
Its losses must equal a single-process run that accumulates the same two micro-batches (tolerance 1e-5
relative: only the order of the gradient reduction differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from salt_ref.models.wan import WanConfig, WanModel
from salt_ref.train import main

TOL = 1e-5


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    for i, name in enumerate(["student", "critic", "teacher"]):
        torch.manual_seed(i)
        model = WanModel(WanConfig.preset("tiny"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file(
        {"context": torch.randn(4, 8, 32, generator=g), "negative": torch.randn(6, 32, generator=g)},
        root / "prompts.safetensors",
    )
    return root


def _args(root, out, iters: int, *extra: str) -> list[str]:
    return [
        "--scale", "full", "--model", "tiny", "--teacher-model", "tiny",
        "--student", str(root / "student.safetensors"), "--critic", str(root / "critic.safetensors"),
        "--teacher", str(root / "teacher.safetensors"), "--prompts", str(root / "prompts.safetensors"),
        "--latent", "3x4x8x8", "--chunk-frames", "2", "--align-block", "2", "--align-start", "0",
        "--total-batch", "2", "--critic-ratio", "1", "--ckpt-every", "1", "--no-progress",
        "--iters", str(iters), "--out", str(out), *extra,
    ]  # fmt: skip


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "salt_ref.train", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def _losses(out) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("loss", "grad_norm"))} for r in rows]


def _close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(rb[k])), (k, ra[k], rb[k])


def test_two_process_fsdp_run_matches_single_process_and_resumes(fixtures, tmp_path):
    torch.set_num_threads(1)
    assert main(_args(fixtures, tmp_path / "single", 3)) == 0
    single = _losses(tmp_path / "single")
    assert {"loss_dmd", "loss_critic"} <= single[0].keys()

    _torchrun(_args(fixtures, tmp_path / "dist", 2))
    ckpt = tmp_path / "dist" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"meta.json", "rng_rank0.pt", "rng_rank1.pt"}
    assert json.loads((ckpt / "meta.json").read_text())["iteration"] == 2
    _close(_losses(tmp_path / "dist"), single[:2])

    _torchrun(_args(fixtures, tmp_path / "dist", 3, "--resume"))
    _close(_losses(tmp_path / "dist"), single)


def test_dry_run_prints_the_plan(capsys):
    assert main(["--scale", "full", "--dry-run", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| student | 1,418,996,800 |" in out and "| teacher | 14,288,491,584 |" in out
    assert "8 accumulation steps" in out and "estimated peak per GPU" in out


def test_large_model_without_cuda_is_one_line_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for CPU-only machines")
    assert main(["--scale", "full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CUDA" in err[0] and "--dry-run" in err[0]


def test_missing_inputs_are_named(capsys):
    assert main(["--scale", "full", "--model", "tiny", "--teacher-model", "tiny"]) == 2
    assert "--student, --critic, --teacher, --prompts" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny", causal=True, num_layers=2)).double()
    x, t, ctx = torch.randn(1, 3, 4, 8, 8).double(), torch.tensor([500.0]).double(), torch.randn(1, 8, 32).double()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, ctx).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

"""The toy CLI: a tiny end-to-end run writes its files; bad input is one error line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from salt_ref.train import main

FAST = [
    "--iters",
    "4",
    "--pretrain-iters",
    "10",
    "--ode-iters",
    "10",
    "--batch",
    "32",
    "--critic-ratio",
    "1",
    "--no-progress",
    "--ckpt-every",
    "2",
]


def test_toy_run_writes_checkpoint_metrics_and_plots(tmp_path, capsys):
    assert main(["--scale", "toy", "--out", str(tmp_path), *FAST]) == 0
    for name in ["checkpoint.safetensors", "metrics.jsonl", "final_metrics.json", "samples.png", "loss.png"]:
        assert (tmp_path / name).stat().st_size > 0, name
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["iterations"] == 4 and set(final["metrics"]) >= {"1", "2", "4", "composition_defect"}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(tmp_path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error:")
    return err[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "gan"], "invalid choice: 'gan'"),
        (["--target", "moon"], "unknown target 'moon'"),
        (["--iters", "-3"], "argument --iters: must be >= 0"),
        (["--target", "missing.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    try:
        code = main([*argv, "--out", str(tmp_path / "o"), *FAST[2:]])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert needle in _error_line(capsys)


def test_unwritable_out_dir_is_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--out", str(blocker / "sub"), *FAST]) == 2
    assert "cannot write to output directory" in _error_line(capsys)


def test_resume_with_checkpoint_of_another_config_is_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--method", "dmd", *FAST]) == 0
    capsys.readouterr()
    assert main(["--out", str(tmp_path), "--method", "sc-dmd", "--resume", *FAST]) == 2
    assert "another config" in _error_line(capsys)


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "salt_ref.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--method" in out.stdout and "--resume" in out.stdout

"""Issue 14, tried as a careless or unlucky user would: every bad input is one ``error:`` line and exit code 2,
every damaged checkpoint is detected and named, a run's folder holds only that run, and nothing earlier changes.

One tiny toy run through the real CLI (``base_run``) serves every damaged-file and refused-resume case: each
case copies it to its own folder and checks the copy's files afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from salt_ref import checkpoint as ckpt
from salt_ref import sample
from salt_ref.checkpoint import CHECKPOINT_NAME, CheckpointDamagedError, CheckpointMismatchError
from salt_ref.loop import METRICS_SCHEMA, LoopConfig, read_metrics, train
from salt_ref.train import build_parser, main
from toy.setup_2d import Toy2DConfig, build_task

FAST = ["--iters", "3", "--pretrain-iters", "2", "--ode-iters", "2", "--batch", "16", "--critic-ratio", "1",
        "--ckpt-every", "1"]  # fmt: skip
FAST += ["--no-progress"]
TINY = dict(batch=16, hidden=16, depth=2, pretrain_iters=2, ode_iters=2, ode_pairs=64, eval_samples=200)
ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in ``folder``: what "no earlier result changed" compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["--out", str(out), *FAST]) == 0
    return out


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


# ------------------------------------------------------------------------------------------ damaged checkpoints


def _damage(raw: bytes, how: str) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    flip = {"header_json": 8 + n // 3, "length_prefix": 1, "weight": len(raw) - 1000}
    if how in flip:
        b = bytearray(raw)
        b[flip[how]] ^= 0x01
        return bytes(b)
    if how == "iteration_edited":  # another valid iteration number, the JSON still well-formed
        i = raw.index(b'iteration\\": 3') + len(b'iteration\\": ')
        return raw[:i] + b"2" + raw[i + 1 :]
    cut = {"zero_bytes": 0, "four_bytes": 4, "mid_header": 8 + n // 2, "half": len(raw) // 2, "minus_one": len(raw) - 1}
    return raw[: cut[how]]


DAMAGES = [
    "zero_bytes",
    "four_bytes",
    "mid_header",
    "half",
    "minus_one",
    "header_json",
    "length_prefix",
    "weight",
    "iteration_edited",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_checkpoint_is_one_line_exit_2_and_left_as_it_was(run_copy, how, capsys):
    path = run_copy / CHECKPOINT_NAME
    path.write_bytes(_damage(path.read_bytes(), how))
    before = _digest(run_copy)
    assert main(["--out", str(run_copy), "--resume", *FAST]) == 2
    line = _one_error_line(capsys)
    assert f"checkpoint {path} is damaged" in line and "--overwrite" in line, line
    assert _digest(run_copy) == before


def test_a_flipped_weight_names_the_tensor_that_fails(run_copy):
    path = run_copy / CHECKPOINT_NAME
    path.write_bytes(_damage(path.read_bytes(), "weight"))
    with pytest.raises(CheckpointDamagedError, match=r"tensor '[\w.]+' fails its checksum"):
        ckpt.load_state(path)


def test_damaged_checkpoint_through_the_real_cli_is_no_traceback(run_copy):
    path = run_copy / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "salt_ref.train", "--out", str(run_copy), "--resume", *FAST],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: checkpoint "), out.stderr


def test_leftover_temp_file_is_removed_and_checkpoint_has_the_outputs_mode(tmp_path, base_run):
    mode = 0o666 & ~ckpt._umask()
    assert (
        (base_run / CHECKPOINT_NAME).stat().st_mode & 0o777
        == mode
        == (base_run / "metrics.jsonl").stat().st_mode & 0o777
    )
    leftover = tmp_path / f".{CHECKPOINT_NAME}.x1y2.tmp"  # what a kill during a save leaves
    leftover.write_bytes(b"partial")
    ckpt.save_atomic(tmp_path / CHECKPOINT_NAME, {"w": torch.ones(3)}, {"iteration": 1})
    assert not leftover.exists()
    assert (tmp_path / CHECKPOINT_NAME).stat().st_mode & 0o777 == mode


def test_checkpoint_without_checksums_from_before_still_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / CHECKPOINT_NAME
    save_file({"w": torch.ones(2)}, str(path), metadata={"salt_ref": json.dumps({"iteration": 5})})
    tensors, header = ckpt.load_state(path)
    assert header["iteration"] == 5 and torch.equal(tensors["w"], torch.ones(2))


# ----------------------------------------------------------------------------------------- resume, changed inputs


def test_refused_resume_names_the_field_and_both_values(run_copy, capsys):
    before = _digest(run_copy)
    assert main(["--out", str(run_copy), "--resume", "--method", "dmd", *FAST]) == 2
    assert "toy.method: checkpoint 'sc-dmd', now 'dmd'" in _one_error_line(capsys)
    assert _digest(run_copy) == before


def test_resume_to_fewer_iterations_than_done_says_so(run_copy, capsys):
    before = _digest(run_copy)
    argv = ["--out", str(run_copy), "--resume", *FAST]
    argv[argv.index("--iters") + 1] = "2"
    assert main(argv) == 2
    assert "already at iteration 3, past --iters 2" in _one_error_line(capsys)
    assert _digest(run_copy) == before


def test_fresh_run_refuses_a_folder_holding_another_runs_checkpoint(run_copy, capsys):
    before = _digest(run_copy)
    assert main(["--out", str(run_copy), *FAST]) == 2
    line = _one_error_line(capsys)
    assert "holds another run's checkpoint at iteration 3" in line and "--resume" in line and "--overwrite" in line
    assert _digest(run_copy) == before


def test_overwrite_clears_the_old_runs_files_so_a_diverging_run_mixes_nothing(run_copy, capsys):
    argv = ["--out", str(run_copy), "--overwrite", *FAST, "--lr-gen", "1e30", "--lr-critic", "1e30"]
    assert main(argv) == 1
    assert "training diverged" in _one_error_line(capsys)
    left = {p.name for p in run_copy.iterdir()}
    # the new run's log and its schema only: nothing of the old run (its checkpoint, results, plots) is left
    assert not left & {CHECKPOINT_NAME, "final_metrics.json", "samples.png", "loss.png"}, left
    assert all(r["iter"] <= 3 for r in read_metrics(run_copy / "metrics.jsonl"))


def test_resume_and_overwrite_together_is_refused(run_copy, capsys):
    before = _digest(run_copy)
    assert main(["--out", str(run_copy), "--resume", "--overwrite", *FAST]) == 2
    assert "give one of them" in _one_error_line(capsys)
    assert _digest(run_copy) == before


def test_mixture_file_edited_between_run_and_resume_is_refused(tmp_path):
    from toy.setup_2d import run

    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"means": [[0, 0], [1, 1]], "stds": [0.1, 0.1], "weights": [1, 1]}))
    cfg = Toy2DConfig(target=str(mix), **TINY)
    loop = LoopConfig(iters=2, critic_ratio=1, ckpt_every=1, log_every=1)
    run(cfg, loop, tmp_path / "r", progress=False)
    before = _digest(tmp_path / "r")
    mix.write_text(json.dumps({"means": [[0, 0], [3, 3]], "stds": [0.1, 0.1], "weights": [1, 1]}))
    with pytest.raises(CheckpointMismatchError, match="target_sha256: checkpoint '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        run(cfg, LoopConfig(iters=3, critic_ratio=1, ckpt_every=1, log_every=1), tmp_path / "r", resume=True)
    assert _digest(tmp_path / "r") == before


class _Killed(Exception):
    pass


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    cfg = Toy2DConfig(**TINY)
    loop = LoopConfig(iters=6, critic_ratio=1, ckpt_every=2, log_every=1, ema_start=1)

    def kill_at_3(done: int, logs: dict) -> None:
        if done == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(build_task(cfg), loop, tmp_path, progress=False, callback=kill_at_3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 4, "loss_g')  # a kill in the middle of a write
    train(build_task(cfg), loop, tmp_path, progress=False, resume=True)
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 7))


# ---------------------------------------------------------------------------------------------- bad mixture files

BAD_MIXTURES = {
    "nan_mean": ('{"means": [[0, 0], [1, NaN]], "stds": [0.1, 0.1], "weights": [1, 1]}', "'means'[1]"),
    "infinite_std": ('{"means": [[0, 0], [1, 1]], "stds": [0.1, Infinity], "weights": [1, 1]}', "'stds'"),
    "short_stds": ('{"means": [[0, 0], [1, 1]], "stds": [0.1], "weights": [1, 1]}', "'stds' has 1 entries for 2"),
    "long_weights": ('{"means": [[0, 0], [1, 1]], "stds": 0.1, "weights": [1, 1, 1]}', "'weights' has 3 entries"),
    "empty_mean": ('{"means": [[]], "stds": [0.1], "weights": [1]}', "'means'[0] must be a 2D point"),
    "three_d": ('{"means": [[0, 0, 0]], "stds": [0.1], "weights": [1]}', "'means'[0] must be a 2D point"),
    "null": ("null", "expected a JSON object"),
    "number": ("3", "expected a JSON object"),
    "bare_list": ("[[0, 0]]", "expected a JSON object"),
    "negative_weight": ('{"means": [[0, 0]], "stds": [0.1], "weights": [-1]}', "'weights' must be finite"),
    "unknown_key": ('{"means": [[0, 0]], "std": [0.1], "stds": [0.1], "weights": [1]}', "unknown keys ['std']"),
    "torn": ('{"means": [[0, 0]]', "is not valid JSON"),
}


@pytest.mark.parametrize("name", list(BAD_MIXTURES))
def test_bad_mixture_file_is_one_line_naming_file_and_field(name, tmp_path, capsys):
    text, needle = BAD_MIXTURES[name]
    mix = tmp_path / f"{name}.json"
    mix.write_text(text)
    assert main(["--target", str(mix), "--out", str(tmp_path / "o"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert f"target file {mix}" in line and needle in line, line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------- full disk


def _disk_full_after(n_ok: int, monkeypatch) -> None:
    """Make every checkpoint write after the first ``n_ok`` fail as safetensors does on a full disk."""
    real, calls = ckpt.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_ok:
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.parametrize("n_ok", [0, 1])
def test_full_disk_is_one_line_naming_the_folder_and_bytes_at_any_checkpoint(n_ok, tmp_path, capsys, monkeypatch):
    _disk_full_after(n_ok, monkeypatch)
    out = tmp_path / "o"
    assert main(["--out", str(out), *FAST]) == 2
    line = _one_error_line(capsys)
    assert f"no space left on device in {out}" in line and "needs about" in line and "bytes" in line, line
    if n_ok:  # the checkpoint written before the disk filled is intact
        assert "is intact" in line and ckpt.read_header(out / CHECKPOINT_NAME)["iteration"] == 1
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- small scale and sampling


def test_memory_window_below_a_chunk_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--scale", "small", "--memory", "window:1", "--out", str(out), "--cache", str(tmp_path / "c")]) == 2
    assert "keeps 1 frames, less than a chunk of 2" in _one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "c").exists()


def test_small_resume_with_other_settings_is_refused_before_the_teacher_trains(tmp_path, capsys):
    out, cache = tmp_path / "o", tmp_path / "c"
    from toy.setup_video import SmallVideoConfig

    old = {"small": SmallVideoConfig(teacher_iters=7).to_dict()}  # the CLI's defaults but another teacher budget
    ckpt.save_atomic(out / CHECKPOINT_NAME, {"w": torch.zeros(1)}, {"iteration": 1, "config": old})
    before = _digest(out)
    assert main(["--scale", "small", "--resume", "--teacher-iters", "5", "--out", str(out), "--cache", str(cache)]) == 2
    assert "small.teacher_iters: checkpoint 7, now 5" in _one_error_line(capsys)
    assert not cache.exists() and _digest(out) == before


@pytest.mark.parametrize("flag, field, was", [("--cfg-scale", "cfg_scale", "2.0"), ("--shift", "shift", "5.0")])
def test_small_recipe_flags_reach_the_recipe(flag, field, was, tmp_path, capsys):
    # a resume under another --cfg-scale / --shift is refused by name: the flag is in the run's recipe, not only parsed
    out, cache = tmp_path / "o", tmp_path / "c"
    from toy.setup_video import SmallVideoConfig

    old = {"small": SmallVideoConfig(teacher_iters=1).to_dict()}  # the CLI's defaults, a 1-step teacher
    ckpt.save_atomic(out / CHECKPOINT_NAME, {"w": torch.zeros(1)}, {"iteration": 1, "config": old})
    args = ["--scale", "small", "--resume", "--teacher-iters", "1", "--out", str(out), "--cache", str(cache)]
    assert main([*args, flag, "1"]) == 2
    assert f"small.recipe.{field}: checkpoint {was}, now 1.0" in _one_error_line(capsys)
    assert not cache.exists()


def test_small_shift_must_be_positive(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--scale", "small", "--shift", "0", "--out", str(out)]) == 2
    assert "recipe: shift must be positive, got 0.0" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--teacher-iters", "--ode-iters", "--iters"])
def test_negative_stage_budget_is_one_line_and_leaves_no_folder(flag, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--scale", "small", flag, "-3", "--out", str(out)]) == 2
    assert f"argument {flag}: must be >= 0, got -3" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("frames", ["0", "-2"])
def test_sample_frames_below_one_is_one_line(frames, tmp_path, capsys):
    assert sample.main(["--run", str(tmp_path), "--frames", frames]) == 2
    assert f"argument --frames: must be >= 1, got {frames}" in _one_error_line(capsys)


def test_sample_mp4_without_ffmpeg_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name))
    assert sample.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "needs the imageio-ffmpeg package" in _one_error_line(capsys)
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize(
    "content, needle",
    [('{"method": "salt", "colour": 3}', "unknown settings ['colour']"), ('{"method": "sa', "is not valid JSON")],
)
def test_sample_names_a_bad_config_json(content, needle, tmp_path, capsys):
    (tmp_path / "config.json").write_text(content)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    assert sample.main(["--run", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert str(tmp_path / "config.json") in line and needle in line, line


# ------------------------------------------------------------------------------------------------- full scale


def test_dcp_rng_files_load_weights_only_and_the_folder_is_documented_as_trusted():
    import inspect

    assert "weights_only=True" in inspect.getsource(ckpt.DCPCheckpointer.load)
    assert "trusted input" in ckpt.DCPCheckpointer.__doc__
    docs = (ROOT / "docs" / "full_scale.md").read_text()
    assert "trusted input" in docs and "Stopping a job" in docs


# --------------------------------------------------------------------------------------- what a newcomer meets


@pytest.mark.parametrize("scale", ["toy", "small", "full"])
def test_every_flag_has_help_and_its_default_shown_once(scale):
    p = build_parser(scale)
    text = p.format_help()
    for action in p._actions:
        assert action.help, f"{scale}: {action.option_strings} has no help"
    assert "``" not in text and "default: None" not in text
    assert "--scale small --help" in text or scale != "toy"
    assert "Exit codes" in text
    assert all(line.count("default") <= 1 for line in text.splitlines())


def test_sample_flags_all_have_help():
    for action in sample._full_parser()._actions:
        assert action.help, action.option_strings


def test_video_method_without_its_scale_gets_a_hint(capsys):
    assert main(["--method", "salt"]) == 2
    assert "add --scale small" in _one_error_line(capsys)


def test_threads_flag_and_torch_default_at_small_scale():
    assert build_parser("small").parse_args([]).threads is None  # torch's default, which honours OMP_NUM_THREADS
    assert build_parser("toy").parse_args(["--threads", "3"]).threads == 3


def test_progress_bar_names_its_stage(tmp_path, capsys):
    loop = LoopConfig(iters=1, critic_ratio=1, ckpt_every=1, log_every=1)
    train(build_task(Toy2DConfig(**TINY)), loop, tmp_path, progress=True, desc="2/3 student init")
    assert "2/3 student init" in capsys.readouterr().err


def test_written_metrics_have_a_schema_and_integers_as_integers(base_run):
    schema = json.loads((base_run / "metrics.schema.json").read_text())
    assert schema == METRICS_SCHEMA
    rows = read_metrics(base_run / "metrics.jsonl")
    assert rows and all(k in schema for r in rows for k in r), rows
    for r in rows:
        for k, v in r.items():
            assert isinstance(v, int) == (schema[k]["type"] == "integer"), (k, v)


def test_loss_plot_has_y_labels_a_legend_and_a_title(base_run, tmp_path, monkeypatch):
    from salt_ref import plots

    figs = []
    monkeypatch.setattr(plots.plt, "close", figs.append)
    plots.plot_losses(base_run / "metrics.jsonl", tmp_path / "loss.png", title="sc-dmd on ring8")
    (fig,) = figs
    assert fig._suptitle.get_text() == "sc-dmd on ring8"
    assert all(ax.get_ylabel() for ax in fig.axes) and fig.axes[0].get_legend() is not None


def test_license_and_citation_are_there():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    readme = (ROOT / "README.md").read_text()
    assert "@software" in readme or "@misc" in readme

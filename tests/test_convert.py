"""``python -m salt_ref.convert``: released pickles and trained runs to official-key safetensors (CPU, tiny Wan)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from salt_ref.checkpoint import DCPCheckpointer, SafetensorsCheckpointer, save_atomic
from salt_ref.convert import clean_key, main
from salt_ref.models.wan import WanConfig, WanModel, load_checkpoint, to_diffusers_keys

TINY = WanConfig.preset("tiny", causal=True)


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse a pickle holding one."""

    def __init__(self) -> None:
        self.value = 3


def _weights(seed: int, cfg: WanConfig = TINY) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in WanModel(cfg).state_dict().items()}


@pytest.fixture(scope="module")
def sd_a() -> dict[str, torch.Tensor]:
    return _weights(0)


@pytest.fixture(scope="module")
def sd_b() -> dict[str, torch.Tensor]:
    return _weights(1)


def _fsdp_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Self-Forcing's EMA-shadow style: wrapper ``model.``, FSDP units per block, activation-checkpoint wrappers."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            k = f"_fsdp_wrapped_module.blocks.{i}._checkpoint_wrapped_module.{rest}"
        out[f"model.{k}"] = v
    return out


def _loaded(path: Path, cfg: WanConfig = TINY) -> dict[str, torch.Tensor]:
    model = WanModel(cfg)
    load_checkpoint(model, path)
    return model.state_dict()


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ import


def test_clean_key_removes_wrapper_components_anywhere():
    assert clean_key("model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.self_attn.q.weight") == (
        "blocks.0.self_attn.q.weight"
    )
    assert clean_key("_orig_mod.model._orig_mod.head.head.weight") == "head.head.weight"
    assert clean_key("model.diffusion_model.head.modulation") == "head.modulation"


def test_import_self_forcing_layout_takes_the_ema_by_default(tmp_path, sd_a, sd_b, capsys):
    src, out = tmp_path / "self_forcing_dmd.pt", tmp_path / "student.safetensors"
    critic = {"model.patch_embedding.weight": torch.zeros(1)}
    torch.save({"generator": _fsdp_names(sd_a), "critic": critic, "generator_ema": _fsdp_names(sd_b)}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 0
    assert "'generator_ema'" in capsys.readouterr().out
    _assert_equal(_loaded(out), sd_b)


def test_import_which_generator_takes_the_other_entry(tmp_path, sd_a, sd_b):
    src, out = tmp_path / "ckpt.pt", tmp_path / "student.safetensors"
    torch.save({"generator": _fsdp_names(sd_a), "generator_ema": _fsdp_names(sd_b)}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny", "--which", "generator"]) == 0
    _assert_equal(_loaded(out), sd_a)


def test_import_orig_mod_names_and_rope_table_dropped(tmp_path, sd_a, capsys):
    """ode_init.pt style (only ``generator``) under torch.compile names; a stored RoPE table is not a weight."""
    src, out = tmp_path / "ode_init.pt", tmp_path / "student.safetensors"
    gen = {f"_orig_mod.model.{k}": v for k, v in sd_a.items()}
    gen["_orig_mod.model.freqs"] = torch.randn(1024, 16, dtype=torch.complex128)
    torch.save({"generator": gen}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "'generator'" in printed and "freqs" in printed
    _assert_equal(_loaded(out), sd_a)


def test_import_bare_state_dict(tmp_path, sd_a):
    src, out = tmp_path / "bare.pt", tmp_path / "student.safetensors"
    torch.save(sd_a, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 0
    _assert_equal(_loaded(out), sd_a)


def test_import_diffusers_names(tmp_path, sd_a):
    src, out = tmp_path / "diffusers.pt", tmp_path / "student.safetensors"
    torch.save({"generator": {to_diffusers_keys(k): v for k, v in sd_a.items()}}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(sd_a)  # official names in the file, not only after load_checkpoint's mapping
    _assert_equal(_loaded(out), sd_a)


def test_import_keeps_the_stored_dtype_unless_asked(tmp_path, sd_a):
    src = tmp_path / "bf16.pt"
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd_a.items()}
    torch.save({"generator": bf16}, src)
    kept, cast = tmp_path / "kept.safetensors", tmp_path / "fp32.safetensors"
    assert main(["import", str(src), "--out", str(kept), "--model", "tiny"]) == 0
    assert main(["import", str(src), "--out", str(cast), "--model", "tiny", "--dtype", "fp32"]) == 0
    with safe_open(str(kept), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(cast), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    _assert_equal(got, {k: v.float() for k, v in bf16.items()})


def test_import_missing_key_is_named_and_nothing_written(tmp_path, sd_a, capsys):
    src, out = tmp_path / "ckpt.pt", tmp_path / "student.safetensors"
    out.write_bytes(b"an older file")
    gen = _fsdp_names(sd_a)
    del gen["model._fsdp_wrapped_module.blocks.1._checkpoint_wrapped_module.ffn.0.bias"]
    torch.save({"generator": gen}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 2
    line = _one_error(capsys)
    assert "1 missing ['blocks.1.ffn.0.bias']" in line
    assert out.read_bytes() == b"an older file"  # refused before writing: the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "student.safetensors"]  # no temp file left


def test_import_write_is_atomic(tmp_path, sd_a, monkeypatch):
    import safetensors.torch

    src, out = tmp_path / "ckpt.pt", tmp_path / "student.safetensors"
    torch.save({"generator": sd_a}, src)
    out.write_bytes(b"an older file")

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 2
    assert out.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "student.safetensors"]


def test_import_unknown_key_is_refused_not_dropped(tmp_path, sd_a, capsys):
    src, out = tmp_path / "ckpt.pt", tmp_path / "student.safetensors"
    gen = {f"model.{k}": v for k, v in sd_a.items()}
    gen["model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(4, 128)  # a weight the model has not
    torch.save({"generator": gen}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 2
    line = _one_error(capsys)
    assert "0 missing [], 1 unexpected ['model.blocks.0.self_attn.q.lora_A.weight'], 0 shape mismatches" in line
    assert not out.exists()


def test_import_one_parameter_under_two_keys_is_refused(tmp_path, sd_a, capsys):
    src = tmp_path / "ckpt.pt"
    torch.save({**sd_a, "model.head.head.bias": torch.zeros_like(sd_a["head.head.bias"])}, src)
    assert main(["import", str(src), "--out", str(tmp_path / "s.safetensors"), "--model", "tiny"]) == 2
    assert "head.head.bias as ['head.head.bias', 'model.head.head.bias']" in _one_error(capsys)


def test_import_shape_mismatch_is_refused(tmp_path, sd_a, capsys):
    src, out = tmp_path / "ckpt.pt", tmp_path / "student.safetensors"
    torch.save({"generator": {**sd_a, "head.head.weight": torch.zeros(5, 128)}}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 2
    assert "1 shape mismatches ['head.head.weight: stored (5, 128) vs model (12, 128)']" in _one_error(capsys)
    assert not out.exists()


def test_import_refuses_a_pickle_that_needs_weights_only_false(tmp_path, sd_a, capsys):
    src, out = tmp_path / "unsafe.pt", tmp_path / "student.safetensors"
    torch.save({"generator": sd_a, "extra": NotATensor()}, src)
    assert main(["import", str(src), "--out", str(out), "--model", "tiny"]) == 2
    line = _one_error(capsys)
    assert "weights_only=True" in line and "weights_only=False" in line and "NotATensor" in line
    assert not out.exists()


def test_import_errors_are_one_line_exit_2(tmp_path, sd_a, capsys):
    out = str(tmp_path / "student.safetensors")
    assert main(["import", str(tmp_path / "absent.pt"), "--out", out]) == 2
    assert "no checkpoint file" in _one_error(capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["import", str(garbage), "--out", out]) == 2
    assert "not a" in _one_error(capsys)
    src = tmp_path / "ckpt.pt"
    torch.save({"generator": sd_a}, src)
    assert main(["import", str(src), "--out", out, "--which", "critic"]) == 2  # not an entry this takes
    assert "invalid choice" in _one_error(capsys)
    assert main(["import", str(src), "--out", out, "--which", "generator_ema", "--model", "tiny"]) == 2
    assert "no 'generator_ema' entry" in _one_error(capsys)
    assert main([]) == 2
    _one_error(capsys)
    assert not Path(out).exists()


def test_import_checks_against_the_chosen_preset(tmp_path, sd_a, capsys):
    src = tmp_path / "ckpt.pt"
    torch.save({"generator": sd_a}, src)
    assert main(["import", str(src), "--out", str(tmp_path / "s.safetensors")]) == 2  # default --model 1.3B
    assert "WanModel(1.3B)" in _one_error(capsys)


# ------------------------------------------------------------------------------------------------ export


def _dcp_run(run: Path, gen: dict, ema: dict, config: dict) -> None:
    folder = run / "checkpoint"
    opt = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(gen.items())[:3]}, "param_groups": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process is what is meant
        dcp.save({"generator": gen, "ema": ema, "opt_gen": opt}, checkpoint_id=str(folder), no_dist=True)
    (folder / "meta.json").write_text(json.dumps({"iteration": 1, "config": config, "world_size": 1}))


def test_export_dcp_run_gives_the_ema(tmp_path, sd_a, sd_b, capsys):
    run, out = tmp_path / "run", tmp_path / "student_ema.safetensors"
    _dcp_run(run, sd_a, sd_b, {})
    assert main(["export", str(run), "--out", str(out), "--model", "tiny"]) == 0
    _assert_equal(_loaded(out), sd_b)
    gen = tmp_path / "student_gen.safetensors"
    assert main(["export", str(run), "--out", str(gen), "--model", "tiny", "--which", "generator"]) == 0
    _assert_equal(_loaded(gen), sd_a)
    assert main(["export", str(run), "--out", str(gen)]) == 2  # meta.json records no shape here: --model needed
    assert "pass --model" in _one_error(capsys)


def test_export_dcp_run_uses_the_stored_student_config(tmp_path, sd_b):
    run, out = tmp_path / "run", tmp_path / "student_ema.safetensors"
    _dcp_run(run, sd_b, sd_b, {"student": TINY.to_dict(), "teacher": {}, "loop": {}})
    assert main(["export", str(run / "checkpoint"), "--out", str(out)]) == 0  # the folder itself also works
    _assert_equal(_loaded(out), sd_b)


def _trained_state(gen: dict, ema: dict) -> SimpleNamespace:
    """What the loop hands its checkpointers: generator, critic, EMA, both optimizers after one step, RNG."""
    modules = []
    for sd in (gen, ema, gen):
        m = WanModel(TINY)
        m.load_state_dict(sd)
        modules.append(m)
    generator, ema_model, critic = modules
    opts = []
    for m in (generator, critic):
        opt = torch.optim.AdamW(m.parameters(), lr=0.0)  # lr 0: the step fills Adam's state, weights stay
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        opts.append(opt)
    return SimpleNamespace(
        task=SimpleNamespace(generator=generator, critic=critic),
        ema=ema_model,
        opt_gen=opts[0],
        opt_critic=opts[1],
        done=7,
        rng_tensors=lambda: {"rng.torch": torch.get_rng_state()},
    )


def test_export_reads_what_the_checkpointers_write(tmp_path, sd_a, sd_b, capsys):
    state = _trained_state(sd_a, sd_b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's single-process notice
        DCPCheckpointer(tmp_path / "full" / "checkpoint").save(state, {"student": TINY.to_dict()})
    SafetensorsCheckpointer(tmp_path / "small" / "checkpoint.safetensors").save(state, {})
    for run, extra in (("full", []), ("small", ["--model", "tiny"])):
        out = tmp_path / f"{run}.safetensors"
        assert main(["export", str(tmp_path / run), "--out", str(out), *extra]) == 0
        assert "iteration 7" in capsys.readouterr().out
        _assert_equal(_loaded(out), sd_b)


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker directory
        return (os.mkdir, (str(self.marker),))


def test_export_dcp_refuses_crafted_metadata(tmp_path, sd_a, capsys):
    run, marker = tmp_path / "run", tmp_path / "ran"
    _dcp_run(run, sd_a, sd_a, {})
    (run / "checkpoint" / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    assert main(["export", str(run), "--out", str(tmp_path / "s.safetensors"), "--model", "tiny"]) == 2
    assert "mkdir is not part of torch.distributed.checkpoint metadata" in _one_error(capsys)
    assert not marker.exists()


def test_export_small_run_gives_the_ema(tmp_path, sd_a, sd_b):
    run, out = tmp_path / "run", tmp_path / "student_ema.safetensors"
    tensors = {**{f"generator.{k}": v for k, v in sd_a.items()}, **{f"ema.{k}": v for k, v in sd_b.items()}}
    tensors["opt_gen.state.0.exp_avg"] = torch.zeros(3)
    save_atomic(run / "checkpoint.safetensors", tensors, {"iteration": 2, "config": {}})
    assert main(["export", str(run), "--out", str(out), "--model", "tiny"]) == 0
    _assert_equal(_loaded(out), sd_b)


def test_export_small_run_uses_the_stored_toy_config(tmp_path):
    from toy.setup_video import SmallVideoConfig, model_config

    small = SmallVideoConfig()
    cfg = model_config(small, causal=True)
    assert cfg.patch_size != TINY.patch_size  # so --model tiny would not fit: the stored shape must be used
    ema = _weights(2, cfg)
    run, out = tmp_path / "run", tmp_path / "student_ema.safetensors"
    save_atomic(
        run / "checkpoint.safetensors", {f"ema.{k}": v for k, v in ema.items()}, {"config": {"small": small.to_dict()}}
    )
    assert main(["export", str(run), "--out", str(out)]) == 0
    _assert_equal(_loaded(out, cfg), ema)


def test_export_errors_are_one_line_exit_2(tmp_path, sd_a, capsys):
    out = str(tmp_path / "s.safetensors")
    assert main(["export", str(tmp_path / "absent"), "--out", out]) == 2
    assert "no run directory" in _one_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", out]) == 2
    assert "holds no checkpoint" in _one_error(capsys)
    plain = tmp_path / "plain" / "checkpoint.safetensors"
    plain.parent.mkdir()
    from safetensors.torch import save_file

    save_file({"ema.x": torch.zeros(1)}, str(plain))  # safetensors, but no salt_ref header
    assert main(["export", str(plain.parent), "--out", out, "--model", "tiny"]) == 2
    assert "not a salt_ref training checkpoint" in _one_error(capsys)
    assert main(["export", str(plain.parent), "--out", out, "--which", "critic"]) == 2
    assert "invalid choice" in _one_error(capsys)
    run = tmp_path / "run"
    save_atomic(run / "checkpoint.safetensors", {f"ema.{k}": v for k, v in sd_a.items()}, {"config": {}})
    assert main(["export", str(run), "--out", out, "--model", "1.3B"]) == 2
    assert "does not match WanModel(1.3B)" in _one_error(capsys)
    assert not Path(out).exists()


def test_module_entry_point(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "salt_ref.convert", "import", str(tmp_path / "absent.pt"), "--out", "x"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint file") and r.stderr.count("\n") == 1

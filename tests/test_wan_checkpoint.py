"""Checkpoint loading for :class:`salt_ref.models.wan.WanModel` at a tiny config (CPU, fp32, fixed seeds).

Official layout (single file, shards + index, folder, ComfyUI prefix), strict-mode errors, meta-device models,
the checkpoints refused with a one-line error (a parameter stored twice, a bad index, a pickle file, a file that is
not safetensors) and, when ``diffusers`` is installed, numerical equivalence with ``WanTransformer3DModel`` in both
key directions.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from salt_ref.models.wan import (
    CheckpointKeyError,
    WanConfig,
    WanModel,
    from_diffusers_keys,
    load_checkpoint,
    to_diffusers_keys,
)

# head_dim 32: RoPE channels (frame, row, column) = (12, 10, 10), the same split in diffusers' WanRotaryPosEmbed.
CFG = WanConfig(
    in_dim=4, out_dim=4, dim=64, ffn_dim=128, freq_dim=32, text_dim=24, text_len=7, num_heads=2, num_layers=2
)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(seed: int) -> WanModel:
    torch.manual_seed(seed)
    return WanModel(CFG).eval()


def _inputs(seed: int = 123, batch: int = 2, text_tokens: int = CFG.text_len):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CFG.in_dim, 3, 8, 8, generator=g)  # 3 x 4 x 4 = 48 tokens
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, text_tokens, CFG.text_dim, generator=g)
    return x, t, context


@torch.no_grad()
def _forward(model: WanModel, inputs) -> torch.Tensor:
    return model(*inputs)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _save_shards(sd: dict[str, torch.Tensor], folder: Path, shard_of) -> Path:
    """Write ``sd`` as ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index; ``shard_of(key) -> int``."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        groups.setdefault(shard_of(k), {})[k] = v
    n = len(groups)
    weight_map = {}
    for i, idx in enumerate(sorted(groups), start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        save_file(_contiguous(groups[idx]), str(folder / name))
        weight_map.update(dict.fromkeys(groups[idx], name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index


def _official_shard(key: str) -> int:
    return 0 if not key.startswith("blocks.") else 1 + int(key.split(".")[1])  # 3 shards for 2 layers


# ------------------------------------------------------------------------------------ official layout


def test_official_single_file_roundtrip(tmp_path):
    ref = _model(0)
    path = tmp_path / "model.safetensors"
    save_file(_contiguous(ref.state_dict()), str(path))
    fresh = _model(1)
    inputs = _inputs()
    assert not torch.equal(_forward(fresh, inputs), _forward(ref, inputs))
    report = load_checkpoint(fresh, path)
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert torch.equal(_forward(fresh, inputs), _forward(ref, inputs))


def test_official_sharded_index_and_folder(tmp_path):
    ref = _model(0)
    index = _save_shards(ref.state_dict(), tmp_path, _official_shard)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    inputs = _inputs()
    expected = _forward(ref, inputs)
    for path in (index, tmp_path):
        fresh = _model(1)
        load_checkpoint(fresh, path)
        assert torch.equal(_forward(fresh, inputs), expected), path


def test_comfyui_prefix(tmp_path):
    ref = _model(0)
    sd = {"model.diffusion_model." + k: v for k, v in _contiguous(ref.state_dict()).items()}
    save_file(sd, str(tmp_path / "wan_comfy.safetensors"))
    fresh = _model(1)
    load_checkpoint(fresh, tmp_path / "wan_comfy.safetensors")
    inputs = _inputs()
    assert torch.equal(_forward(fresh, inputs), _forward(ref, inputs))


# --------------------------------------------------------------------------------------- strict mode


def _load_error(tmp_path, sd) -> tuple[str, dict]:
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointKeyError) as info:
        load_checkpoint(_model(1), path)
    report = load_checkpoint(_model(1), path, strict=False)
    return str(info.value), report


def test_strict_missing_key(tmp_path):
    sd = _contiguous(_model(0).state_dict())
    del sd["blocks.1.ffn.2.bias"]
    msg, report = _load_error(tmp_path, sd)
    assert "blocks.1.ffn.2.bias" in msg and "1 missing" in msg
    assert report == {"missing": ["blocks.1.ffn.2.bias"], "unexpected": [], "shape_mismatch": []}


def test_strict_unexpected_key(tmp_path):
    sd = _contiguous(_model(0).state_dict())
    sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(CFG.dim, CFG.dim)
    msg, report = _load_error(tmp_path, sd)
    assert "blocks.0.cross_attn.k_img.weight" in msg and "1 unexpected" in msg
    assert report == {"missing": [], "unexpected": ["blocks.0.cross_attn.k_img.weight"], "shape_mismatch": []}


def test_strict_shape_mismatch_and_non_strict_load(tmp_path):
    ref = _model(0)
    sd = _contiguous(ref.state_dict())
    sd["head.head.weight"] = torch.zeros(8, CFG.dim)
    msg, _ = _load_error(tmp_path, sd)
    assert "head.head.weight" in msg and "(8, 64)" in msg and "(16, 64)" in msg
    fresh = _model(1)
    before = fresh.head.head.weight.detach().clone()
    report = load_checkpoint(fresh, tmp_path / "bad.safetensors", strict=False)
    assert report["missing"] == [] and report["unexpected"] == []
    assert len(report["shape_mismatch"]) == 1 and report["shape_mismatch"][0].startswith("head.head.weight:")
    assert torch.equal(fresh.head.head.weight, before)  # the mismatched tensor is left alone
    assert torch.equal(fresh.blocks[1].ffn[2].weight, ref.blocks[1].ffn[2].weight)  # the rest is loaded


def test_missing_shard_named(tmp_path):
    index = _save_shards(_model(0).state_dict(), tmp_path, _official_shard)
    gone = "diffusion_pytorch_model-00002-of-00003.safetensors"
    (tmp_path / gone).unlink()
    with pytest.raises(FileNotFoundError, match=gone):
        load_checkpoint(_model(1), index)


# --------------------------------------------------------------------------------------- meta device


def test_meta_device_model(tmp_path):
    ref = _model(0)
    path = tmp_path / "model.safetensors"
    save_file(_contiguous(ref.state_dict()), str(path))
    with torch.device("meta"):
        meta = WanModel(CFG)
    with pytest.raises(ValueError, match="meta device"):
        load_checkpoint(meta, path)
    model = meta.to_empty(device="cpu").eval()
    load_checkpoint(model, path)
    inputs = _inputs()
    assert torch.equal(_forward(model, inputs), _forward(ref, inputs))


# ------------------------------------------------------------------------------------- key mapping


def test_key_mapping_is_invertible_and_matches_reference():
    keys = list(_model(0).state_dict())
    mapped = [to_diffusers_keys(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    assert [from_diffusers_keys(k) for k in mapped] == keys
    expected = {
        "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
        "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "head.modulation": "scale_shift_table",
        "head.head.weight": "proj_out.weight",
        "blocks.1.modulation": "blocks.1.scale_shift_table",
        "blocks.0.norm3.bias": "blocks.0.norm2.bias",
        "blocks.0.ffn.0.weight": "blocks.0.ffn.net.0.proj.weight",
        "blocks.0.ffn.2.bias": "blocks.0.ffn.net.2.bias",
        "blocks.0.self_attn.o.weight": "blocks.0.attn1.to_out.0.weight",
        "blocks.0.self_attn.norm_q.weight": "blocks.0.attn1.norm_q.weight",
        "blocks.1.cross_attn.k.bias": "blocks.1.attn2.to_k.bias",
        "blocks.1.cross_attn.norm_k.weight": "blocks.1.attn2.norm_k.weight",
        "patch_embedding.weight": "patch_embedding.weight",
    }
    for official, diffusers_key in expected.items():
        assert to_diffusers_keys(official) == diffusers_key


# ------------------------------------------------------------------------------- diffusers equivalence


def _diffusers_model(seed: int = 7):
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=CFG.num_heads,
        attention_head_dim=CFG.head_dim,
        in_channels=CFG.in_dim,
        out_channels=CFG.out_dim,
        text_dim=CFG.text_dim,
        freq_dim=CFG.freq_dim,
        ffn_dim=CFG.ffn_dim,
        num_layers=CFG.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=CFG.eps,
        rope_max_seq_len=CFG.rope_max_len,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every tensor random: nothing can match by being 0 or 1
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


@torch.no_grad()
def _diffusers_forward(model, x, t, context) -> torch.Tensor:
    return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 0.1
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max abs diff {err:.3g} at output scale {scale:.3g}"


def _diffusers_shard(key: str) -> int:
    # The middle shard holds neither condition_embedder.*, proj_out.* nor any attention key: its layout
    # can only be told from the other shards.
    if ".attn" in key:
        return 0
    return 2 if key.startswith(("condition_embedder.", "proj_out.")) else 1


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_diffusers_checkpoint_matches_diffusers_forward(tmp_path, layout):
    theirs = _diffusers_model()
    sd = _contiguous(theirs.state_dict())
    if layout == "single":
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file(sd, str(path))
    else:
        path = _save_shards(sd, tmp_path, _diffusers_shard)
    ours = _model(1)
    assert load_checkpoint(ours, path) == {"missing": [], "unexpected": [], "shape_mismatch": []}

    x, t, context = _inputs()
    expected = _diffusers_forward(theirs, x, t, context)
    _assert_close(_forward(ours, (x, t, context)), expected)
    # the tolerance is meaningful: an unloaded model is far off
    assert (_forward(_model(1), (x, t, context)) - expected).abs().max() > 1e-2

    # shorter text: we pad with zeros internally, diffusers is given the zero-padded context
    short = context[:, :4]
    expected = _diffusers_forward(theirs, x, t, F.pad(short, (0, 0, 0, CFG.text_len - 4)))
    _assert_close(_forward(ours, (x, t, short)), expected)


def test_to_diffusers_keys_loads_strictly_into_diffusers():
    ref = _model(0)
    with torch.no_grad():  # move the norms and the head off their (ones / random-normal) init too
        for name, p in ref.named_parameters():
            if "norm" in name or "modulation" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    theirs = _diffusers_model(seed=99)
    result = theirs.load_state_dict({to_diffusers_keys(k): v for k, v in ref.state_dict().items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, t, context = _inputs(seed=5)
    _assert_close(_forward(ref, (x, t, context)), _diffusers_forward(theirs, x, t, context))


# ------------------------------------------------------------------------------- refused checkpoints


def _save_two_shards(tmp_path, first: dict, second: dict) -> Path:
    """Two shards + index; the index maps each key to the first shard holding it (as a hand-edited index might)."""
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map: dict[str, str] = {}
    for name, sd in zip(names, (first, second), strict=True):
        save_file(sd, str(tmp_path / name))
        for k in sd:
            weight_map.setdefault(k, name)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


@pytest.mark.parametrize("case", ["diffusers_twin", "comfyui_prefix", "two_shards"])
def test_parameter_stored_twice_is_refused(tmp_path, case):
    sd = _contiguous(_model(0).state_dict())
    if case == "diffusers_twin":
        # the rest of the checkpoint is official: the twin is mapped by itself, not by a whole-file layout guess
        sd["blocks.0.attn1.to_q.weight"] = sd["blocks.0.self_attn.q.weight"].clone()
        path, keys = tmp_path / "mixed.safetensors", ["'blocks.0.self_attn.q.weight'", "'blocks.0.attn1.to_q.weight'"]
        save_file(sd, str(path))
    elif case == "comfyui_prefix":
        sd["model.diffusion_model.head.head.weight"] = sd["head.head.weight"].clone()
        path, keys = tmp_path / "comfy.safetensors", ["'head.head.weight'", "'model.diffusion_model.head.head.weight'"]
        save_file(sd, str(path))
    else:
        first = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
        second = {k: v for k, v in sd.items() if k.startswith("blocks.1.")}
        second["blocks.0.ffn.2.bias"] = sd["blocks.0.ffn.2.bias"].clone()
        path = _save_two_shards(tmp_path, first, second)
        keys = [
            "'blocks.0.ffn.2.bias' in model-00001-of-00002.safetensors",
            "'blocks.0.ffn.2.bias' in model-00002-of-00002.safetensors",
        ]
    for strict in (True, False):  # which copy would load is ambiguous, so not even a lenient load goes ahead
        with pytest.raises(CheckpointKeyError) as info:
            load_checkpoint(_model(1), path, strict=strict)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "stores 1 parameter under more than one key" in msg, msg
        assert all(k in msg for k in keys), msg


def test_mixed_layouts_without_twins_load(tmp_path):
    ref = _model(0)
    sd = {
        (to_diffusers_keys(k) if k.startswith("blocks.1.") else k): v for k, v in _contiguous(ref.state_dict()).items()
    }
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    fresh = _model(1)
    assert load_checkpoint(fresh, path) == {"missing": [], "unexpected": [], "shape_mismatch": []}
    inputs = _inputs()
    assert torch.equal(_forward(fresh, inputs), _forward(ref, inputs))


@pytest.mark.parametrize(
    ("text", "reason"),
    [('{"metadata": {"total_size": 0}}', "has no 'weight_map'"), ('{"weight_map": {', "not valid JSON")],
)
def test_bad_index_named(tmp_path, text, reason):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    for path in (index, tmp_path):  # the index itself, or the folder holding it
        with pytest.raises(ValueError) as info:
            load_checkpoint(_model(1), path)
        msg = str(info.value)
        assert msg.startswith(f"checkpoint index {index} ") and reason in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "case", ["pt_suffix", "protocol0_ckpt_suffix", "zip_other_name", "legacy_other_name", "folder", "index_shard"]
)
def test_pickle_checkpoint_refused(tmp_path, case):
    sd = _contiguous(_model(0).state_dict())
    if case == "pt_suffix":
        path = named = tmp_path / "wan.pt"
        torch.save(sd, path)
    elif case in ("zip_other_name", "legacy_other_name"):  # told by the first bytes: zip archive or pickle PROTO
        path = named = tmp_path / "wan.safetensors"
        torch.save(sd, path, _use_new_zipfile_serialization=case == "zip_other_name")
    elif case == "protocol0_ckpt_suffix":  # a pickle without the PROTO byte: told by its suffix alone
        path = named = tmp_path / "wan.ckpt"
        named.write_bytes(pickle.dumps({"blocks.0.modulation": [0.0]}, protocol=0))
    elif case == "folder":
        path = tmp_path
        torch.save(sd, tmp_path / "pytorch_model-00001.bin")
        torch.save({}, tmp_path / "pytorch_model-00002.bin")
        (tmp_path / "config.json").write_text("{}")
    else:
        save_file(sd, str(tmp_path / "a.safetensors"))
        named = tmp_path / "b.ckpt"
        torch.save({}, named)
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.ckpt"}}))
    with pytest.raises(ValueError) as info:
        load_checkpoint(_model(1), path)
    msg = str(info.value)
    if case == "folder":
        assert msg.startswith(
            f"{tmp_path} holds only pickle checkpoints (pytorch_model-00001.bin, pytorch_model-00002.bin)"
        )
    else:
        assert msg.startswith(
            f"{named} is a pickle checkpoint: pickle checkpoints are not loaded (loading one can run code)"
        )
    assert "safetensors.torch.save_file of torch.load(path, weights_only=True)" in msg and "\n" not in msg, msg


def test_safetensors_named_like_a_pickle_still_loads(tmp_path):
    ref = _model(0)
    path = tmp_path / "diffusion_pytorch_model.bin"  # the contents decide, as before; only pickles are refused
    save_file(_contiguous(ref.state_dict()), str(path))
    fresh = _model(1)
    load_checkpoint(fresh, path)
    inputs = _inputs()
    assert torch.equal(_forward(fresh, inputs), _forward(ref, inputs))


@pytest.mark.parametrize("case", ["random_bytes", "truncated", "truncated_shard"])
def test_unreadable_safetensors_named(tmp_path, case):
    sd = _contiguous(_model(0).state_dict())
    if case == "random_bytes":
        bad = path = tmp_path / "wan.safetensors"
        g = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)
        noise[0] = 0x11  # not the zip / pickle magic: this file must reach safetensors
        bad.write_bytes(bytes(noise.tolist()))
    elif case == "truncated":
        bad = path = tmp_path / "wan.safetensors"
        save_file(sd, str(bad))
        bad.write_bytes(bad.read_bytes()[:-100])
    else:
        path = _save_shards(sd, tmp_path, _official_shard)
        bad = tmp_path / "diffusion_pytorch_model-00003-of-00003.safetensors"
        bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError) as info:
        load_checkpoint(_model(1), path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {bad} is not a readable safetensors file (") and msg.endswith(")"), msg
    assert "\n" not in msg

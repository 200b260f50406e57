"""Tests of salt_ref.video_io: Wan VAE loading (diffusers folder and official .pth), latent decoding, mp4 writing.

Everything runs on CPU with a tiny random ``AutoencoderKLWan`` (base_dim 4, z_dim 4, Wan 2.1's block layout), so
nothing is downloaded and the file takes seconds.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from tiny_wan import VAE_TINY as TINY
from tiny_wan import vae_official_state

from salt_ref.video_io import (
    WAN21_VAE_CONFIG,
    decode_latents,
    diffusers_to_official_key,
    load_wan_vae,
    official_to_diffusers_key,
    write_mp4,
)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY).eval().requires_grad_(False)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------ facts


def test_wan21_config_is_diffusers_default():
    # Two sources for the same numbers: Wan's vae.py (copied into WAN21_VAE_CONFIG) and AutoencoderKLWan's defaults.
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    for key, value in WAN21_VAE_CONFIG.items():
        assert defaults[key] == value, key
    assert len(WAN21_VAE_CONFIG["latents_mean"]) == len(WAN21_VAE_CONFIG["latents_std"]) == 16


def test_full_size_key_map_agrees_with_diffusers_converter():
    with torch.device("meta"):
        full = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    state = full.state_dict()
    assert len(state) == 194  # the official file's key count (wan21.md, from instantiating Wan's WanVAE_)
    assert sum(p.numel() for p in full.parameters()) == 126_892_531
    official = {diffusers_to_official_key(k): k for k in state}
    assert len(official) == len(state)  # one-to-one
    assert all(official_to_diffusers_key(o) == k for o, k in official.items())
    # diffusers' own converter (hard-coded for Wan 2.1) is an independent oracle for the official names
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    converted = convert_wan_vae_to_diffusers({o: state[k] for o, k in official.items()})
    assert set(converted) == set(state)
    assert all(converted[k] is state[k] for k in state)
    # names quoted in Wan's vae.py structure / diffusers' converter
    for name in [
        "conv1.weight",
        "conv2.bias",
        "encoder.conv1.weight",
        "encoder.middle.1.to_qkv.weight",
        "encoder.head.0.gamma",
        "encoder.downsamples.2.resample.1.weight",
        "encoder.downsamples.5.time_conv.weight",
        "decoder.upsamples.3.resample.1.weight",
        "decoder.upsamples.7.time_conv.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.14.residual.6.bias",
        "decoder.head.2.weight",
    ]:
        assert name in official, name


def test_key_map_round_trips_for_other_layouts():
    cfg = {**TINY, "num_res_blocks": 1, "dim_mult": [1, 2, 2]}
    cfg["temperal_downsample"] = [False, True]
    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg)
    layout = {"num_stages": 3, "num_res_blocks": 1}
    keys = list(vae.state_dict())
    official = [diffusers_to_official_key(k, **layout) for k in keys]
    assert len(set(official)) == len(keys)
    assert [official_to_diffusers_key(o, **layout) for o in official] == keys
    assert official_to_diffusers_key("decoder.upsamples.8.time_conv.weight", **layout).startswith("decoder.upsamples")


# ------------------------------------------------------------------------------------------------ loading


def test_load_diffusers_folder(tiny_vae, tmp_path):
    folder = tmp_path / "pipe" / "vae"
    tiny_vae.save_pretrained(folder)
    for path in (folder, tmp_path / "pipe"):  # the vae/ folder itself, or the pipeline folder above it
        vae = load_wan_vae(path)
        _assert_same_weights(vae, tiny_vae)
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_latents(vae, latents), decode_latents(tiny_vae, latents))
    with pytest.raises(ValueError, match="config_overrides"):
        load_wan_vae(folder, config_overrides={"z_dim": 4})


def test_diffusers_folder_with_missing_key_is_refused(tiny_vae, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_in.bias"]  # diffusers' from_pretrained would re-initialise it randomly, with a warning
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.conv_in\.bias.*unexpected \(1\): decoder\.extra"):
        load_wan_vae(tmp_path)


def test_load_official_pth_exact_weights(tiny_vae, tmp_path):
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(vae_official_state(tiny_vae), pth)
    vae = load_wan_vae(pth, config_overrides=TINY)
    _assert_same_weights(vae, tiny_vae)
    assert list(vae.config.latents_mean) == TINY["latents_mean"]
    assert list(vae.config.latents_std) == TINY["latents_std"]
    half = load_wan_vae(pth, config_overrides=TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_official_pth_key_errors_name_the_keys(tiny_vae, tmp_path):
    state = vae_official_state(tiny_vae)
    del state["decoder.upsamples.4.shortcut.weight"]
    state["decoder.upsamples.15.residual.0.gamma"] = torch.ones(4, 1, 1, 1)  # the last stage has no Resample
    state["decoder.head.2.bias"] = torch.zeros(5)  # 3 expected
    pth = tmp_path / "bad.pth"
    torch.save(state, pth)
    with pytest.raises(ValueError) as err:
        load_wan_vae(pth, config_overrides=TINY)
    msg = str(err.value)
    assert "missing (1): decoder.upsamples.4.shortcut.weight" in msg  # named as in the .pth
    assert "unexpected (1): decoder.upsamples.15.residual.0.gamma" in msg
    assert "wrong shape (1): decoder.head.2.bias [5] (model [3])" in msg
    with pytest.raises(ValueError, match="latents_mean has 16 values for z_dim=4"):
        load_wan_vae(pth, config_overrides={k: v for k, v in TINY.items() if k != "latents_mean"})


# ------------------------------------------------------------------------------------------------ decoding


def test_decode_latents_shape_range_and_denormalisation(tiny_vae):
    x = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    video = decode_latents(tiny_vae, x)
    assert video.shape == (1, 3, 9, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    mean = torch.tensor(TINY["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(TINY["latents_std"]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        by_hand = tiny_vae.decode(x * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(video, by_hand, rtol=0, atol=1e-6)
    # the direction is Wan's: encode normalises mu as (mu - mean) * (1 / std), so decoding that gives decode(mu)
    clip = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mu = tiny_vae.encode(clip).latent_dist.mode()
        direct = tiny_vae.decode(mu).sample
    torch.testing.assert_close(decode_latents(tiny_vae, (mu - mean) * (1 / std)), direct, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 4, F, H, W\]"):
        decode_latents(tiny_vae, torch.zeros(1, 16, 3, 4, 4))


# ------------------------------------------------------------------------------------------------ writing


def _read(path: Path):
    import imageio.v2 as iio

    with iio.get_reader(path, format="FFMPEG") as reader:
        return [f for f in reader], reader.get_meta_data()


def test_write_mp4_reads_back_tiled(tmp_path):
    t, h, w = 9, 32, 48
    dark = torch.full((3, t, h, w), -1.0)
    bright = torch.full((3, t, h, w), 1.0)
    out = write_mp4(torch.stack([dark, bright]), tmp_path / "sub" / "pair.mp4", fps=16)
    assert out == tmp_path / "sub" / "pair.mp4"
    frames, meta = _read(out)
    assert len(frames) == t
    assert all(f.shape == (h, 2 * w, 3) for f in frames)  # side by side, not resized
    assert meta["fps"] == 16
    assert frames[4][:, :w].mean() < 20 and frames[4][:, w:].mean() > 235  # batch order: left to right
    assert sorted(p.name for p in out.parent.iterdir()) == ["pair.mp4"]  # no temporary file left
    single, _ = _read(write_mp4(bright[:, :5], tmp_path / "one.mp4"))
    assert len(single) == 5 and single[0].shape == (h, w, 3)
    with pytest.raises(ValueError, match="even"):
        write_mp4(torch.zeros(3, 2, 31, 32), tmp_path / "odd.mp4")


def test_write_mp4_is_atomic(tmp_path, monkeypatch):
    import imageio.v2 as iio

    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous")

    def broken_writer(uri, **kwargs):
        Path(uri).write_bytes(b"half")
        raise RuntimeError("ffmpeg died")

    monkeypatch.setattr(iio, "get_writer", broken_writer)
    with pytest.raises(RuntimeError, match="ffmpeg died"):
        write_mp4(torch.zeros(3, 2, 16, 16), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_write_mp4_without_imageio_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` raise ImportError
    with pytest.raises(ImportError, match="pip install imageio-ffmpeg"):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())

"""The decode end of the full-scale chain: Wan 2.1 VAE weights in, student latents decoded, ``.mp4`` out.

**Latent space.** Wan 2.1's VAE maps a video in [-1, 1] to a raw latent ``z`` with 16 channels, compressed by
``vae_stride = (4, 8, 8)`` in (time, height, width); time is causal, the first frame is encoded on its own and
every later group of 4 frames into one latent frame:

    video [B, 3, 4(F - 1) + 1, 8H, 8W]   <->   z [B, 16, F, H, W]

The diffusion model, and so the student, works in the per-channel normalised space

    x_c = (z_c - mean_c) / std_c          (encode side)
    z_c = x_c * std_c + mean_c            (decode side: what decode_latents does before vae.decode)

with ``mean``, ``std`` = the VAE config's ``latents_mean``, ``latents_std`` (16 numbers each). Wan's own code
(``wan/modules/vae.py``) writes this with ``scale = [mean, 1 / std]``: encode ``(mu - scale[0]) * scale[1]``,
decode ``z / scale[1] + scale[0]``; diffusers' ``WanPipeline`` decodes ``latents / (1 / std) + mean``. The
decoder's output is clamped to [-1, 1].

**Weights.** :func:`load_wan_vae` reads either a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, as ``Wan2.1-T2V-1.3B-Diffusers/vae``) or the official ``Wan2.1_VAE.pth``,
whose keys are renamed to diffusers' ``AutoencoderKLWan`` names by :func:`official_to_diffusers_key`
(:func:`diffusers_to_official_key` is the other direction). Either way every key and shape is checked first and a
mismatch is one ``ValueError`` naming the keys: diffusers' own ``from_pretrained`` would fill a missing weight with
random numbers and only log a warning.

**Video files.** :func:`write_mp4` writes a ``[3, T, H, W]`` video, or a batch of them side by side, as H.264
through imageio's ffmpeg plugin (the ``imageio-ffmpeg`` package), atomically.

diffusers (for ``AutoencoderKLWan``) and imageio-ffmpeg are imported only when these functions run.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

__all__ = [
    "WAN21_VAE_CONFIG",
    "VAE_STRIDE",
    "load_wan_vae",
    "decode_latents",
    "write_mp4",
    "official_to_diffusers_key",
    "diffusers_to_official_key",
]

VAE_STRIDE = (4, 8, 8)
"""(time, height, width) compression of the Wan 2.1 VAE (Wan's ``vae_stride``)."""

# The architecture of Wan2.1_VAE.pth, in AutoencoderKLWan's argument names. Source: Wan2.1 wan/modules/vae.py,
# `_video_vae` (dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=
# [False, True, True], dropout=0.0) with `WanVAE(z_dim=16)`, and the per-channel mean/std lists of `WanVAE.__init__`.
# A .pth file has no config of its own, so this is what it is loaded into unless `config_overrides` says otherwise.
# fmt: off
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],  # sic: the upstream spelling of the argument
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}
# fmt: on

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_MAX_LISTED = 20
_FFMPEG_ADVICE = "writing .mp4 files needs the imageio-ffmpeg package: pip install imageio-ffmpeg"

# ------------------------------------------------------------------------------------------------ key names
#
# Official (wan/modules/vae.py) module tree versus diffusers' (autoencoder_kl_wan.py), as read from both sources and
# from diffusers' converters (scripts/convert_wan_to_diffusers.py `convert_vae`, and
# loaders/single_file_utils.py `convert_wan_vae_to_diffusers`, which hard-code the Wan 2.1 block indices):
#
#   conv1 / conv2 (the 1x1x1 convs around the latent)   -> quant_conv / post_quant_conv
#   {encoder,decoder}.conv1                              -> {encoder,decoder}.conv_in
#   {encoder,decoder}.middle.{0,1,2}                     -> {...}.mid_block.{resnets.0, attentions.0, resnets.1}
#   {encoder,decoder}.head.{0,2} (RMS norm, SiLU, conv)  -> {...}.{norm_out, conv_out}
#   encoder.downsamples.{i}                              -> encoder.down_blocks.{i}      (same flat order)
#   decoder.upsamples.{j} (flat: per stage num_res_blocks + 1 residual blocks, then one Resample but in the last
#                          stage)                        -> decoder.up_blocks.{stage}.resnets.{k} / .upsamplers.0
#   inside a residual block: residual.{0,2,3,6} (norm, SiLU, conv, norm, SiLU, dropout, conv), shortcut
#                                                        -> norm1, conv1, norm2, conv2, conv_shortcut
#   attention (norm, to_qkv, proj) and Resample (resample.1, time_conv) keep their names.

_TOP_LEVEL = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
_PER_CODER = [("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out.")]
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_RESIDUAL = [
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]

_OFFICIAL_MIDDLE = re.compile(r"^(encoder|decoder)\.middle\.(\d+)\.(.+)$")
_OFFICIAL_DOWN = re.compile(r"^encoder\.downsamples\.(\d+)\.(.+)$")
_OFFICIAL_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")
_DIFFUSERS_MIDDLE = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.\d+|attentions\.\d+)\.(.+)$")
_DIFFUSERS_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$")


def _swap_prefix(rest: str, table: list[tuple[str, str]], *, inverse: bool = False) -> str:
    for a, b in table:
        old, new = (b, a) if inverse else (a, b)
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def official_to_diffusers_key(key: str, *, num_stages: int = 4, num_res_blocks: int = 2) -> str:
    """Diffusers' ``AutoencoderKLWan`` name of a ``Wan2.1_VAE.pth`` key; a key no rule knows comes back unchanged.

    ``num_stages`` (``len(dim_mult)``) and ``num_res_blocks`` fix how the decoder's flat ``upsamples`` list splits
    into diffusers' per-stage ``up_blocks``; the defaults are Wan 2.1's. An unknown key is returned as it is so that
    the loader's key check reports it as unexpected.
    """
    per_stage = num_res_blocks + 2  # residual blocks + the stage's Resample (absent in the last stage)
    for old, new in _TOP_LEVEL:
        if key.startswith(old):
            return new + key[len(old) :]
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key
    for old, new in _PER_CODER:
        if rest.startswith(old):
            return f"{coder}.{new}{rest[len(old) :]}"
    if m := _OFFICIAL_MIDDLE.match(key):
        coder, index, inner = m.groups()
        if index in _MIDDLE:
            return f"{coder}.mid_block.{_MIDDLE[index]}.{_swap_prefix(inner, _RESIDUAL)}"
    elif m := _OFFICIAL_DOWN.match(key):
        index, inner = m.groups()
        return f"encoder.down_blocks.{index}.{_swap_prefix(inner, _RESIDUAL)}"
    elif m := _OFFICIAL_UP.match(key):
        index, inner = int(m.group(1)), m.group(2)
        stage, k = divmod(index, per_stage)
        if stage < num_stages - 1 and k == per_stage - 1:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{inner}"
        if stage < num_stages and k <= num_res_blocks:
            return f"decoder.up_blocks.{stage}.resnets.{k}.{_swap_prefix(inner, _RESIDUAL)}"
    return key


def diffusers_to_official_key(key: str, *, num_stages: int = 4, num_res_blocks: int = 2) -> str:
    """The inverse of :func:`official_to_diffusers_key`: the ``Wan2.1_VAE.pth`` name of an ``AutoencoderKLWan`` key."""
    per_stage = num_res_blocks + 2
    for new, old in _TOP_LEVEL:
        if key.startswith(old):
            return new + key[len(old) :]
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key
    for new, old in _PER_CODER:
        if rest.startswith(old):
            return f"{coder}.{new}{rest[len(old) :]}"
    if m := _DIFFUSERS_MIDDLE.match(key):
        coder, block, inner = m.groups()
        index = {v: k for k, v in _MIDDLE.items()}.get(block)
        if index is not None:
            return f"{coder}.middle.{index}.{_swap_prefix(inner, _RESIDUAL, inverse=True)}"
    elif m := _DIFFUSERS_DOWN.match(key):
        index, inner = m.groups()
        return f"encoder.downsamples.{index}.{_swap_prefix(inner, _RESIDUAL, inverse=True)}"
    elif m := _DIFFUSERS_UP.match(key):
        stage, resnet, inner = int(m.group(1)), m.group(3), m.group(4)
        if resnet is None:
            return f"decoder.upsamples.{stage * per_stage + per_stage - 1}.{inner}"
        return f"decoder.upsamples.{stage * per_stage + int(resnet)}.{_swap_prefix(inner, _RESIDUAL, inverse=True)}"
    return key


# ------------------------------------------------------------------------------------------------ loading


def _diffusers_vae_class() -> type[AutoencoderKLWan]:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:  # diffusers is otherwise only a test dependency of this package
        raise ImportError(f"load_wan_vae needs diffusers (AutoencoderKLWan): pip install diffusers ({e})") from e
    return AutoencoderKLWan


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _check_keys(
    source: Path,
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    shown_as: Mapping[str, str] | None = None,
) -> None:
    """One ValueError naming missing, unexpected and wrongly shaped keys (in the file's own names)."""
    name = (lambda k: shown_as.get(k, k)) if shown_as else (lambda k: k)
    missing = sorted(name(k) for k in expected.keys() - found.keys())
    unexpected = sorted(name(k) for k in found.keys() - expected.keys())
    shapes = sorted(
        f"{name(k)} {list(found[k])} (model {list(expected[k])})"
        for k in found.keys() & expected.keys()
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = [
        f"{label} ({len(keys)}): {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if keys
    ]
    if problems:
        raise ValueError(f"{source} does not match the Wan VAE: " + "; ".join(problems))


def _meta_shapes(cls: type[AutoencoderKLWan], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # the key set and shapes only; nothing is allocated
        model = cls.from_config(dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_latent_stats(config: Mapping[str, Any], source: Path) -> None:
    z_dim = config["z_dim"]
    for field in ("latents_mean", "latents_std"):
        if len(config[field]) != z_dim:
            raise ValueError(f"{source}: {field} has {len(config[field])} values for z_dim={z_dim}")


def _load_diffusers_folder(path: Path, device: str | torch.device, dtype: torch.dtype) -> AutoencoderKLWan:
    cls = _diffusers_vae_class()
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder (Wan2.1-T2V-1.3B-Diffusers): its VAE lives in vae/
    weights = path / _DIFFUSERS_WEIGHTS
    if not (path / "config.json").is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a diffusers VAE folder (config.json and {_DIFFUSERS_WEIGHTS} expected)")
    config = cls.load_config(path)
    _check_latent_stats(config, path)
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:  # header only: names and shapes, no tensor is read
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    _check_keys(weights, found, _meta_shapes(cls, config))
    vae = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_official_pth(
    path: Path, device: str | torch.device, dtype: torch.dtype, config_overrides: Mapping[str, Any] | None
) -> AutoencoderKLWan:
    cls = _diffusers_vae_class()
    config = {**WAN21_VAE_CONFIG, **(config_overrides or {})}
    _check_latent_stats(config, path)
    if config["attn_scales"]:  # diffusers' decoder up-blocks have no attention layers to put such weights in
        raise ValueError(f"attn_scales={config['attn_scales']} is not supported; Wan 2.1 uses []")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: a pickle cannot run code here
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat {{name: tensor}} state dict as Wan2.1_VAE.pth is")
    layout = {"num_stages": len(config["dim_mult"]), "num_res_blocks": config["num_res_blocks"]}
    renamed: dict[str, Tensor] = {}
    official_name: dict[str, str] = {}
    for key, tensor in state.items():
        new = official_to_diffusers_key(key, **layout)
        if new in renamed:
            raise ValueError(f"{path}: {official_name[new]} and {key} both map to {new}")
        renamed[new], official_name[new] = tensor, key
    expected = _meta_shapes(cls, config)
    for key in expected.keys() - renamed.keys():  # name missing weights as they would appear in the .pth
        official_name[key] = diffusers_to_official_key(key, **layout)
    _check_keys(path, {k: tuple(v.shape) for k, v in renamed.items()}, expected, official_name)
    with torch.device("meta"):
        vae = cls(**config)
    vae.load_state_dict(renamed, strict=True, assign=True)  # keys already checked; assign avoids a second copy
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_wan_vae(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_overrides: Mapping[str, Any] | None = None,
) -> AutoencoderKLWan:
    """Load the Wan 2.1 VAE as diffusers' ``AutoencoderKLWan``, in eval mode with gradients off.

    Args:
        path: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; a pipeline folder with a
            ``vae/`` subfolder also works), read from local files only; or the official ``Wan2.1_VAE.pth``, read
            with ``torch.load(weights_only=True)`` and renamed by :func:`official_to_diffusers_key`.
        device: where the weights go.
        dtype: their dtype. Wan runs its VAE in float32, the default.
        config_overrides: for a ``.pth`` only: entries replacing those of :data:`WAN21_VAE_CONFIG` (a file without
            a config is assumed to be Wan 2.1's VAE). ``latents_mean``/``latents_std`` must have ``z_dim`` values.

    Raises:
        ValueError: the file's keys or shapes differ from the model's (missing, unexpected and wrongly shaped keys
            are named, the first 20 of each), the folder lacks its files, or ``config_overrides`` is given with a
            folder (whose ``config.json`` is the configuration).
    """
    path = Path(path)
    if path.is_dir():
        if config_overrides:
            raise ValueError(f"{path} is a diffusers folder: its config.json is the config, config_overrides is not")
        return _load_diffusers_folder(path, device, dtype)
    if not path.is_file():
        raise FileNotFoundError(f"no VAE checkpoint at {path}")
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: expected a diffusers folder or the official Wan2.1_VAE.pth")
    return _load_official_pth(path, device, dtype, config_overrides)


# ------------------------------------------------------------------------------------------------ decoding


def decode_latents(vae: AutoencoderKLWan, latents: Tensor) -> Tensor:
    """Decode normalised Wan latents ``[B, z_dim, F, H, W]`` to a video ``[B, 3, 4(F - 1) + 1, 8H, 8W]`` in [-1, 1].

    The latents are the diffusion model's, ``x = (z - mean) / std`` per channel, so the VAE is given
    ``z = x * std + mean`` with ``mean``, ``std`` from ``vae.config.latents_mean``/``latents_std`` (Wan's
    ``z / scale[1] + scale[0]`` with ``scale = [mean, 1 / std]``). The de-normalisation is done in float32, the
    decode in the VAE's dtype (float32 from :func:`load_wan_vae` by default, as Wan does) without gradients; the
    result is float32 on the VAE's device. diffusers' decoder runs latent frame by latent frame with its causal
    cache, so no chunking is needed here.
    """
    z_dim = vae.config.z_dim
    if latents.ndim != 5 or latents.shape[1] != z_dim:
        raise ValueError(f"latents must be [B, {z_dim}, F, H, W], got {list(latents.shape)}")
    param = next(vae.parameters())
    view = (1, z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=param.device).view(view)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=param.device).view(view)
    with torch.no_grad():
        z = latents.to(device=param.device, dtype=torch.float32) * std + mean
        video = vae.decode(z.to(param.dtype)).sample
    # diffusers already clamps; clamping again keeps the documented range whatever the decoder version does
    return video.float().clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ writing


def _to_frames(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` or ``[B, 3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, B * W, 3]``, the batch side by side."""
    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [3, T, H, W] or [B, 3, T, H, W], got {list(video.shape)}")
    b, _, t, h, w = video.shape
    if h % 2 or w % 2:  # H.264 in yuv420p halves the chroma planes; odd sizes would be resized or refused
        raise ValueError(f"video height and width must be even for H.264 (yuv420p), got {h}x{w}")
    pixels = ((video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    # [B, 3, T, H, W] -> [T, H, B, W, 3] -> [T, H, B * W, 3]: video i occupies columns i*W .. (i+1)*W - 1
    return pixels.permute(2, 3, 0, 4, 1).reshape(t, h, b * w, 3).numpy()


def write_mp4(video: Tensor, path: str | os.PathLike[str], fps: int = 16) -> Path:
    """Write a video in [-1, 1] (``[3, T, H, W]``, or ``[B, 3, T, H, W]`` tiled left to right) as an H.264 ``.mp4``.

    Frames are rounded to uint8 and encoded by ffmpeg (``libx264``, imageio quality 8) at ``fps`` (Wan samples at
    16). The file is written under a temporary name in the same folder and moved over ``path`` when complete, so a
    reader never sees half a video. Height and width must be even (decoded Wan videos are multiples of 8).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ImportError: imageio-ffmpeg is not installed.
    """
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg  # noqa: F401 - imageio's FFMPEG plugin needs it; import it to fail early and clearly
    except ImportError as e:
        raise ImportError(f"{_FFMPEG_ADVICE} ({e})") from e
    frames = _to_frames(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg picks the container from the extension, so the temporary name must end in .mp4 too
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.mp4", dir=path.parent)
    os.close(fd)
    try:
        # macro_block_size=1: never resize (imageio would otherwise pad/resize to multiples of 16)
        with iio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

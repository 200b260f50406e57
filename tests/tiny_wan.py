"""Tiny random stand-ins for the official Wan 2.1 downloads, in their file layouts (shared by the tests).

Nothing is downloaded: a test builds a ``Wan2.1-T2V-1.3B``-like folder with

- ``models_t5_umt5-xxl-enc-bf16.pth``: a tiny ``UMT5EncoderModel`` saved under Wan's official T5 key names, with
  its ``config.json`` (``model_type: umt5``) beside it, and a word-level tokenizer in ``google/umt5-xxl/``;
- ``Wan2.1_VAE.pth``: a tiny ``AutoencoderKLWan`` under the official VAE key names, and ``vae_config.json``;
- tiny Wan DiT checkpoints (official keys, safetensors) for the student, critic and teacher roles, and a prompt
  file of random text states (the inputs of a tiny full-scale run, also used by ``scripts/gpu_smoke.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "a red fox runs over the hill & blue cat sleeps on warm stone under an old tree".split()
UMT5_TINY = {"vocab_size": 40, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}

# Wan 2.1's VAE layout (4 stages, 2 residual blocks, temporal down-sampling in the last two) at a toy width, with
# latent statistics far from (0, 1) so that a wrong or inverted de-normalisation shows.
VAE_TINY = {
    "base_dim": 4,
    "z_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.5, -0.7, 1.2, 0.1],
    "latents_std": [2.0, 0.5, 1.5, 3.0],
}


def umt5_official_key(hf_key: str) -> str | None:
    """transformers UMT5EncoderModel key -> the key in Wan's T5 checkpoint (None: the tied copy, not stored)."""
    top = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    if hf_key in top:
        return top[hf_key]
    if hf_key == "encoder.embed_tokens.weight":
        return None
    _, _, i, rest = hf_key.split(".", 3)
    block = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # Wan: fc1(x) * gelu(gate(x))
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    return f"blocks.{i}.{block[rest]}"


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` (pad 0, eos 1, unk 2), saved like ``google/umt5-xxl``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def write_umt5(root: Path, seed: int = 0):
    """Tiny umT5 encoder in Wan's layout under ``root``; returns the transformers model it was saved from."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.UMT5Config(**UMT5_TINY)
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():  # norms away from 1, so swapping norm1/norm2 or gate/fc1 would show in the outputs
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    official = {umt5_official_key(k): v.clone() for k, v in model.state_dict().items() if umt5_official_key(k)}
    torch.save(official, root / "models_t5_umt5-xxl-enc-bf16.pth")
    config.to_json_file(root / "config.json")
    write_tokenizer(root / "google" / "umt5-xxl")
    return model


def vae_official_state(vae, num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLWan``'s weights under the official Wan 2.1 VAE key names."""
    from salt_ref.video_io import diffusers_to_official_key

    layout = {"num_stages": len(vae.config.dim_mult), "num_res_blocks": num_res_blocks}
    return {diffusers_to_official_key(k, **layout): v.clone() for k, v in vae.state_dict().items()}


def write_vae(root: Path, seed: int = 0, z_dim: int = 3):
    """Tiny VAE as ``root/Wan2.1_VAE.pth`` plus ``root/vae_config.json``; returns the diffusers model.

    ``z_dim`` 3 matches the ``tiny`` Wan preset's 3 latent channels (the real pair has 16)."""
    from diffusers import AutoencoderKLWan

    config = {**VAE_TINY, "z_dim": z_dim, "latents_mean": VAE_TINY["latents_mean"][:z_dim],
              "latents_std": VAE_TINY["latents_std"][:z_dim]}  # fmt: skip
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**config).eval().requires_grad_(False)
    torch.save(vae_official_state(vae), root / "Wan2.1_VAE.pth")
    (root / "vae_config.json").write_text(json.dumps(config))
    return vae


def write_dit(path: Path, seed: int, **overrides) -> None:
    """A tiny random Wan DiT (official keys) as one safetensors file."""
    from safetensors.torch import save_file

    from salt_ref.models.wan import WanConfig, WanModel

    torch.manual_seed(seed)
    model = WanModel(WanConfig.preset("tiny", **overrides))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def write_prompt_states(path: Path) -> None:
    """A prompt file as ``salt_ref.encode_prompts`` writes it, random: ``context [4, 8, 32]``, ``negative [6, 32]``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"context": torch.randn(4, 8, 32, generator=g), "negative": torch.randn(6, 32, generator=g)}, path)


def write_run_inputs(root: Path, names: tuple[str, ...] = ("student", "critic", "teacher")) -> Path:
    """Tiny random DiT checkpoints ``root/<name>.safetensors`` (seed ``i`` for ``names[i]``) and
    ``root/prompts.safetensors``: the inputs of a tiny full-scale run."""
    for i, name in enumerate(names):
        write_dit(root / f"{name}.safetensors", seed=i)
    write_prompt_states(root / "prompts.safetensors")
    return root

"""``python -m salt_ref.encode_prompts`` on a tiny random umT5 saved under the official Wan key names.

Nothing is downloaded: the encoder is a random ``UMT5EncoderModel`` whose weights are written as Wan's
``models_t5_umt5-xxl-enc-bf16.pth`` would hold them (the inverse rename below is written out here, independently of
the module's), and the tokenizer is a word-level one saved as ``google/umt5-xxl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_wan import UMT5_TINY as TINY
from tiny_wan import WORDS, write_umt5

from salt_ref.encode_prompts import (
    TEXT_LEN,
    UMT5_XXL,
    WAN_NEGATIVE_PROMPT,
    clean_text,
    encode_prompts,
    load_encoder,
    load_t5_config,
    load_tokenizer,
    main,
)
from salt_ref.video_task import EmbeddingPrompts


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A Wan-like folder: tiny official-key T5 weights + its umt5 config.json + google/umt5-xxl tokenizer."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wan")
    model = write_umt5(root)
    return root, model, transformers.AutoTokenizer.from_pretrained(root / "google" / "umt5-xxl")


def _reference(model, tokenizer, text: str) -> torch.Tensor:
    """The tiny encoder called directly, Wan's way: padded to 512, masked, trimmed to the true tokens."""
    t = tokenizer(
        [text], padding="max_length", truncation=True, max_length=512, add_special_tokens=True, return_tensors="pt"
    )
    with torch.no_grad():
        h = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state[0]
    return h[: int(t["attention_mask"].sum())]


def _run(wan_dir: Path, prompts: list[str], tmp_path: Path, *extra: str) -> Path:
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "prompts.safetensors"
    args = ["--wan-dir", str(wan_dir), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out)]
    assert main([*args, "--device", "cpu", "--dtype", "fp32", "--quiet", *extra]) == 0
    return out


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_clean_text_unescapes_html_twice_and_collapses_whitespace():
    assert clean_text("  a &amp;amp; red\t\tfox \n runs  ") == "a & red fox runs"
    assert clean_text("&lt;b&gt;") == "<b>"


def test_file_holds_the_encoder_states_trimmed_and_zero_padded(wan, tmp_path):
    root, model, tok = wan
    raw = ["a red fox", "  the  blue cat &amp;amp;  sleeps on warm stone  ", "", "an old tree"]
    cleaned = ["a red fox", "the blue cat & sleeps on warm stone", "an old tree"]  # blank line skipped
    out = _run(root, raw, tmp_path, "--batch", "2", "--negative", "blue  cat")
    data, meta = _load(out)
    refs = [_reference(model, tok, t) for t in cleaned]
    lens = [r.shape[0] for r in refs]
    assert lens == [4, 9, 4]  # </s> counted, as Wan's mask.sum()
    assert tuple(data["context"].shape) == (3, max(lens), TINY["d_model"])  # L = the longest prompt of the file
    for row, ref, n in zip(data["context"], refs, lens, strict=True):
        torch.testing.assert_close(row[:n], ref, atol=1e-5, rtol=0)
        assert torch.equal(row[n:], torch.zeros_like(row[n:]))  # exact zeros, not the encoder's pad states
    neg = _reference(model, tok, "blue cat")
    assert tuple(data["negative"].shape) == (neg.shape[0], TINY["d_model"])
    torch.testing.assert_close(data["negative"], neg, atol=1e-5, rtol=0)
    assert meta["negative_prompt"] == "blue cat"
    assert data["context"].dtype == torch.float32


def test_embedding_prompts_reads_the_file(wan, tmp_path):
    root, _, _ = wan
    out = _run(root, ["a red fox runs over the hill", "cat"], tmp_path, "--negative", "a")
    prompts = EmbeddingPrompts(str(out))
    assert len(prompts) == 2
    ctx, neg = prompts.sample(5, torch.Generator().manual_seed(0))
    assert ctx.shape == neg.shape == (5, 8, TINY["d_model"])  # 7 words + </s>; negative "a </s>" padded to 8
    assert torch.equal(neg[:, 2:], torch.zeros_like(neg[:, 2:]))
    assert ctx.abs().sum() > 0


def test_default_negative_is_wans_sample_neg_prompt(wan, tmp_path):
    # sha256 of sample_neg_prompt in Wan2.1 wan/configs/shared_config.py (commit 9737cba)
    digest = "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"
    assert hashlib.sha256(WAN_NEGATIVE_PROMPT.encode()).hexdigest() == digest
    _, meta = _load(_run(wan[0], ["a red fox"], tmp_path))
    assert meta["negative_prompt"] == WAN_NEGATIVE_PROMPT


def test_more_prompts_than_the_batch_are_streamed_in_batches(wan, tmp_path):
    root, model, tok = wan
    prompts = [" ".join(WORDS[i : i + 1 + i % 5]) for i in range(7)]
    sizes: list[int] = []
    hook = model.register_forward_hook(lambda m, a, kw, out: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = tmp_path / "p.safetensors"
        tokenizer = load_tokenizer(root / "google" / "umt5-xxl")
        shapes = encode_prompts(model, tokenizer, prompts, out, negative="", batch=3, progress=False)
    finally:
        hook.remove()
    assert sizes == [1, 3, 3, 1]  # the negative, then batches of 3: never all prompts in one call
    data, _ = _load(out)
    assert tuple(data["context"].shape) == shapes["context"] == (7, 6, TINY["d_model"])
    for row, text in zip(data["context"], prompts, strict=True):  # each row = its prompt encoded on its own
        ref = _reference(model, tok, text)
        torch.testing.assert_close(row[: ref.shape[0]], ref, atol=1e-5, rtol=0)
        assert torch.equal(row[ref.shape[0] :], torch.zeros_like(row[ref.shape[0] :]))
    assert tuple(data["negative"].shape) == (1, TINY["d_model"])  # "" -> just </s>


def test_a_prompt_past_512_tokens_is_truncated(wan, tmp_path):
    root, model, tok = wan
    long = " ".join(WORDS * 40)  # 760 words
    data, _ = _load(_run(root, [long, "a cat"], tmp_path))
    assert tuple(data["context"].shape) == (2, TEXT_LEN, TINY["d_model"])
    torch.testing.assert_close(data["context"][0], _reference(model, tok, long), atol=1e-5, rtol=0)


def test_a_failed_run_leaves_no_file_and_keeps_the_old_one(wan, tmp_path):
    root, model, _ = wan
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"old")
    calls = []

    def fail_on_third(m, a, kw, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = model.register_forward_hook(fail_on_third, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            tokenizer = load_tokenizer(root / "google" / "umt5-xxl")
            encode_prompts(model, tokenizer, ["a", "red", "fox", "cat"], out, batch=1, progress=False)
    finally:
        hook.remove()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no temporary file left


def test_config_comes_from_a_umt5_config_json_only(tmp_path):
    t5 = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    xxl = load_t5_config(None, t5)
    assert {k: getattr(xxl, k) for k in UMT5_XXL} == UMT5_XXL
    # Wan's own config.json (the DiT's) sits next to the T5 weights: it must not be read as the encoder's
    dit = {"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "num_heads": 12, "num_layers": 30}
    (tmp_path / "config.json").write_text(json.dumps(dit))
    ignored = load_t5_config(None, t5)
    assert {k: getattr(ignored, k) for k in UMT5_XXL} == UMT5_XXL
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "umt5", **TINY}))
    assert load_t5_config(None, t5).d_ff == TINY["d_ff"]
    (tmp_path / "other.json").write_text(json.dumps({"d_model": 48, "num_heads": 6, "d_kv": 8}))
    given = load_t5_config(tmp_path / "other.json", t5)
    assert (given.d_model, given.num_heads, given.vocab_size) == (48, 6, UMT5_XXL["vocab_size"])


def test_load_encoder_casts_every_weight_and_ties_the_embedding(wan):
    root, _, _ = wan
    config = load_t5_config(None, root / "models_t5_umt5-xxl-enc-bf16.pth")
    model = load_encoder(root / "models_t5_umt5-xxl-enc-bf16.pth", config, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # wo too, as Wan runs it
    assert model.encoder.embed_tokens.weight is model.shared.weight


def _broken(tmp_path: Path, wan_dir: Path, case: str) -> tuple[list[str], str]:
    """(extra CLI args, expected message fragment) for one bad input."""
    state = torch.load(wan_dir / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    bad = tmp_path / "bad.pth"
    cfg = ["--t5-config", str(wan_dir / "config.json")]
    if case == "missing_key":
        del state["blocks.1.ffn.fc2.weight"]
        torch.save(state, bad)
        return ["--t5", str(bad), *cfg], "missing keys: blocks.1.ffn.fc2.weight"
    if case == "unexpected_key":
        state["blocks.0.ffn.fc3.weight"] = torch.zeros(1)
        torch.save(state, bad)
        return ["--t5", str(bad), *cfg], "unexpected keys: blocks.0.ffn.fc3.weight"
    if case == "not_a_state_dict":
        torch.save({"epoch": 3}, bad)
        return ["--t5", str(bad), *cfg], "is not a state dict"
    if case == "not_a_pickle":
        bad.write_bytes(b"no pickle here")
        return ["--t5", str(bad), *cfg], "cannot read T5 checkpoint"
    if case == "missing_t5":
        return ["--t5", str(tmp_path / "nope.pth")], "nope.pth not found"
    if case == "missing_tokenizer":
        return ["--tokenizer", str(tmp_path / "no_tok")], "no_tok not found"
    if case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n  \n\n")
        return ["--prompts", str(tmp_path / "empty.txt")], "holds no prompts"
    if case == "missing_wan_dir":
        return ["--wan-dir", str(tmp_path / "no_wan")], "no_wan not found"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing_key",
        "unexpected_key",
        "not_a_state_dict",
        "not_a_pickle",
        "missing_t5",
        "missing_tokenizer",
        "empty_prompts",
        "missing_wan_dir",
    ],
)
def test_bad_inputs_give_one_error_line_and_exit_2(wan, tmp_path, capsys, case):
    root = wan[0]
    extra, fragment = _broken(tmp_path, root, case)
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    out = tmp_path / "out.safetensors"
    args = ["--wan-dir", str(root), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main([*args, "--device", "cpu", *extra]) == 2  # argparse: the last --prompts/--wan-dir given wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists()


def test_a_missing_prompt_file_exits_2_from_the_command_line(wan, tmp_path):
    cmd = [sys.executable, "-m", "salt_ref.encode_prompts", "--wan-dir", str(wan[0])]
    cmd += ["--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: prompt file {tmp_path / 'nope.txt'} not found"], res.stderr
    assert not (tmp_path / "o.safetensors").exists()

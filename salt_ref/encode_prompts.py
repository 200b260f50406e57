r"""Encode a prompt list with Wan 2.1's umT5-XXL text encoder into the file the trainer reads.

``python -m salt_ref.encode_prompts --wan-dir Wan2.1-T2V-1.3B --prompts prompts.txt --out prompts.safetensors``
writes the safetensors file that :class:`~salt_ref.video_task.EmbeddingPrompts` loads::

    context   [N, L, D]   row n = the encoder's last hidden state of prompt n (its first len_n tokens), zeros after
    negative  [L_neg, D]  the same for the negative prompt (the unconditional branch of CFG)

with ``D = d_model`` (4096 for umT5-XXL), ``L = max_n len_n`` (the longest prompt of the file, at most 512) and
``L_neg`` the negative prompt's own token count. ``EmbeddingPrompts`` zero-pads both to ``max(L, L_neg)`` when it
loads them, and the Wan DiT zero-pads again to its ``text_len = 512``: storing the trimmed form instead of 512 rows
per prompt only saves disk and memory (often 4-10x), the states the DiT sees are the same. The file is
``N * L * D * 2`` bytes in bf16 (10k prompts of 120 tokens: 9.8 GB); the trainer reads it memory-mapped, only
the rows each rank draws.

Per prompt, as Wan's ``T5EncoderModel.__call__`` does (``wan/modules/t5.py``)::

    text  = collapse_whitespace(html.unescape(html.unescape(text)).strip())
    ids, mask = tokenizer(text, padding="max_length", truncation=True, max_length=512, add_special_tokens=True)
    len   = sum(mask)                                   (true token count, </s> included, <= 512)
    h     = encoder(ids [B, 512], mask [B, 512])        [B, 512, D]  all 512 positions, pad keys masked out
    row   = h[:len], then zeros up to L                 (Wan keeps h[:len]; the DiT pads it with zeros)

Wan also runs ``ftfy.fix_text`` first; ftfy is not a dependency here, so its fixes (mojibake, odd quotes and
dashes) are skipped. For clean UTF-8 prompts this changes nothing; otherwise clean them with ftfy beforehand.

The encoder is ``transformers.UMT5EncoderModel`` built from a ``UMT5Config`` (umT5-XXL by default: vocab 256384,
d_model 4096, d_kv 64, d_ff 10240, 64 heads, 24 layers, 32 buckets, max distance 128, gated tanh-GELU, one relative
position bias per layer) and the official ``models_t5_umt5-xxl-enc-bf16.pth`` weights, renamed key by key by
:func:`official_to_hf`. A ``config.json`` of ``model_type`` ``umt5`` next to the weights, or ``--t5-config``,
overrides those numbers (used by the tests with a tiny encoder); Wan's own ``config.json`` in the same folder
describes the DiT and is ignored.

Prompts are encoded ``--batch`` at a time and their rows written straight into the output file (the safetensors
header is written first: its sizes are known after one tokenizer pass), so memory stays at one batch whatever N is.
The file is written under a temporary name in the output folder and renamed at the end: a run that is killed or
fails leaves no partial output.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor

from salt_ref.cli import Parser, positive_int

if TYPE_CHECKING:  # transformers is imported only when an encoder is built: the rest of salt_ref does not need it
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

__all__ = [
    "TEXT_LEN",
    "T5_CHECKPOINT",
    "T5_TOKENIZER",
    "WAN_NEGATIVE_PROMPT",
    "UMT5_XXL",
    "EncodeError",
    "clean_text",
    "official_to_hf",
    "convert_state_dict",
    "load_t5_config",
    "load_encoder",
    "load_tokenizer",
    "read_prompts",
    "encode_prompts",
    "main",
]

TEXT_LEN = 512
"""Wan's ``text_len``: the tokenizer pads/truncates to it and the encoder always runs on this many positions."""
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
"""File name of the encoder weights inside the Wan folder (``wan/configs`` ``t5_checkpoint``)."""
T5_TOKENIZER = "google/umt5-xxl"
"""Tokenizer folder inside the Wan folder (``wan/configs`` ``t5_tokenizer``)."""

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan's ``sample_neg_prompt`` (``wan/configs/shared_config.py``), the default ``--negative``."""

UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,  # dim_attn 4096 / 64 heads
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",  # transformers maps it to gelu_new = the tanh GELU Wan uses
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,  # inert: the encoder runs in eval mode
    "pad_token_id": 0,
    "eos_token_id": 1,
}
"""``UMT5Config`` fields of Wan's ``umt5_xxl`` encoder (``wan/modules/t5.py``)."""


class EncodeError(Exception):
    """A problem with the inputs (a missing file, a wrong checkpoint): ``main`` prints it as one ``error:`` line."""


# ----------------------------------------------------------------------------------------------------------- text


def clean_text(text: str) -> str:
    """Wan's ``clean='whitespace'`` text cleaning without ftfy: unescape HTML twice, strip, collapse whitespace.

    ``ftfy.fix_text`` (Wan's first step) is skipped: ftfy is not a dependency of this package.
    """
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8), cleaned by :func:`clean_text`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise EncodeError(f"prompt file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EncodeError(f"prompt file {path} is not UTF-8 text ({e})") from None
    prompts = [t for t in map(clean_text, lines) if t]
    if not prompts:
        raise EncodeError(f"prompt file {path} holds no prompts (one per line)")
    return prompts


# ------------------------------------------------------------------------------------------------- key mapping

# Official key (Wan's T5Encoder) -> transformers UMT5EncoderModel key. Wan's block i is
#   x += attn(norm1(x), pos_bias=pos_embedding);  x += fc2(fc1(y) * gelu(gate(y))), y = norm2(x)
# and transformers' block i is layer.0 (layer_norm + SelfAttention with its own relative_attention_bias) then
# layer.1 (layer_norm + DenseReluDense: wo(gelu(wi_0 y) * wi_1 y)). So the GELU branch gate.0 is wi_0 and the
# linear branch fc1 is wi_1 - swapping them would still load (same shapes) but give wrong states.
_TOP_LEVEL = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_PER_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# transformers keeps the input embedding twice in its state dict (tied to shared.weight): filled from it, not read
_TIED = {"encoder.embed_tokens.weight": "shared.weight"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_MAX_LISTED = 20


def official_to_hf(key: str) -> str | None:
    """The ``UMT5EncoderModel`` name of an official Wan T5 key, or ``None`` for a key with no counterpart."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _PER_BLOCK:
        return f"encoder.block.{int(m.group(1))}.{_PER_BLOCK[m.group(2)]}"
    return None


def _hf_to_official(key: str) -> str:
    """Inverse of :func:`official_to_hf`, to name missing keys as they are spelled in the official file."""
    inverse_top = {v: k for k, v in _TOP_LEVEL.items()}
    if key in inverse_top:
        return inverse_top[key]
    m = _HF_BLOCK_KEY.fullmatch(key)
    inverse_block = {v: k for k, v in _PER_BLOCK.items()}
    if m and m.group(2) in inverse_block:
        return f"blocks.{m.group(1)}.{inverse_block[m.group(2)]}"
    return key


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def convert_state_dict(state: dict[str, Tensor], expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Rename an official state dict to ``UMT5EncoderModel`` keys, checking it against the model's keys and shapes.

    Args:
        state: the official checkpoint (``token_embedding.weight``, ``blocks.{i}.attn.q.weight``, ...).
        expected: ``{name: shape}`` of the model's ``state_dict()``.

    Returns:
        ``{transformers name: tensor}`` covering every key of ``expected`` (the tied embedding shares its tensor).

    Raises:
        EncodeError: one message naming the missing keys, the unexpected keys (official spelling, first 20 of
            each) and the shape mismatches.
    """
    renamed: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = official_to_hf(key)
        if name is None or name not in expected:
            unexpected.append(key)
        else:
            renamed[name] = value
    for tied, source in _TIED.items():
        if tied in expected and source in renamed:
            renamed[tied] = renamed[source]
    missing = [_hf_to_official(k) for k in expected if k not in renamed]
    wrong = [
        f"{_hf_to_official(k)} {tuple(v.shape)} (model {tuple(expected[k])})"
        for k, v in renamed.items()
        if k not in _TIED and tuple(v.shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_listed(wrong)}")
    if problems:
        raise EncodeError("the T5 checkpoint does not match the encoder config; " + "; ".join(problems))
    return renamed


# ------------------------------------------------------------------------------------------------ model, tokenizer


def load_t5_config(config_path: str | os.PathLike | None, t5_path: str | os.PathLike) -> UMT5Config:
    """The encoder's ``UMT5Config``: ``config_path`` if given, else a umt5 ``config.json`` next to the weights.

    Either file may hold only some fields; the rest are :data:`UMT5_XXL`'s. A ``config.json`` next to the weights
    whose ``model_type`` is not ``umt5`` (Wan's folder has the DiT's) is ignored; without one the config is
    umT5-XXL.
    """
    from transformers import UMT5Config

    fields = dict(UMT5_XXL)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise EncodeError(f"T5 config {path} not found")
        fields.update(_read_json(path))
    else:
        beside = Path(t5_path).parent / "config.json"
        if beside.is_file():
            data = _read_json(beside)
            if data.get("model_type") == "umt5":
                fields.update(data)
    try:
        return UMT5Config.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise EncodeError(f"bad T5 config: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncodeError(f"cannot read {path} as JSON ({e})") from None
    if not isinstance(data, dict):
        raise EncodeError(f"{path} must hold a JSON object")
    return data


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise EncodeError(f"T5 checkpoint {path} not found")
    try:
        # mmap (zip-format files only): the 11 GB bf16 file is paged in as tensors are used, never held twice in RAM
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle, zip and EOF errors come as many types; all mean "not a usable file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncodeError(f"cannot read T5 checkpoint {path}: {first}") from None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise EncodeError(f"T5 checkpoint {path} is not a state dict (a dict of name -> tensor)")
    return state


def load_encoder(
    t5_path: str | os.PathLike,
    config: UMT5Config,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5EncoderModel:
    """``UMT5EncoderModel(config)`` holding the official weights at ``t5_path``, in eval mode on ``device``.

    Built on the meta device and filled with ``assign=True``, so the 5.7B parameters are never randomly
    initialised nor held twice. Every weight, ``wo`` included, is cast to ``dtype``, as Wan runs the whole encoder
    in bf16 (transformers' own loader would keep ``wo`` in fp32).
    """
    from transformers import UMT5EncoderModel

    state = _read_checkpoint(Path(t5_path))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(convert_state_dict(state, expected), strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # re-tie: one embedding table, not two copies on the device
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a buffer the checkpoint cannot fill would silently stay uninitialised
        raise RuntimeError(f"encoder tensors left on the meta device: {leftover[:_MAX_LISTED]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer saved in folder ``path`` (Wan ships it as ``<wan-dir>/google/umt5-xxl``)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise EncodeError(f"tokenizer folder {path} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise EncodeError(f"cannot load the tokenizer in {path}: {str(e).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        raise EncodeError(f"the tokenizer in {path} has no pad token")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise EncodeError(f"the tokenizer in {path} has {len(tokenizer)} tokens, more than the encoder's {vocab_size}")
    tokenizer.padding_side = "right"  # the true tokens must come first: rows are trimmed to h[:len]
    return tokenizer


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    ids = tokenizer(list(texts), truncation=True, max_length=TEXT_LEN, add_special_tokens=True)["input_ids"]
    return [len(x) for x in ids]


def _encode_batch(
    model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], length: int
) -> tuple[Tensor, Tensor]:
    """``(rows [B, length, D] zero past each prompt's tokens, lens [B])`` for cleaned ``texts``."""
    tokens = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=TEXT_LEN,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = model.shared.weight.device
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    lens = mask.gt(0).sum(dim=1)
    with torch.inference_mode():
        # all 512 positions, as Wan runs it: the pad keys are masked, the outputs at pad positions are discarded
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = torch.arange(length, device=device)[None, :] < lens[:, None]
    rows = hidden[:, :length].masked_fill(~keep[..., None], 0.0)  # exact zeros, as Wan's DiT pads
    return rows, lens.cpu()


# ------------------------------------------------------------------------------------------------------ the file

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class _StreamingSafetensors:
    """A safetensors file whose tensors' sizes are fixed up front and whose bytes arrive piece by piece, in order.

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` (padded with
    spaces to a multiple of 8), then the tensors' raw little-endian bytes back to back.
    """

    def __init__(self, f: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        if sys.byteorder != "little":  # raw tensor bytes are written as they lie in memory
            raise RuntimeError("writing safetensors needs a little-endian machine")
        header: dict[str, Any] = {"__metadata__": metadata}
        self.sizes: dict[str, int] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        self.f, self.specs, self.order, self.written = f, specs, list(specs), dict.fromkeys(specs, 0)

    def write(self, name: str, data: Tensor) -> None:
        """Append ``data`` (rows of tensor ``name``) after what was written; tensors must be written in order."""
        dtype, _ = self.specs[name]
        if data.dtype != dtype:
            raise ValueError(f"{name}: got {data.dtype}, the header says {dtype}")
        earlier = self.order[: self.order.index(name)]
        if any(self.written[n] != self.sizes[n] for n in earlier):
            raise RuntimeError(f"{name} written before the tensors ahead of it are complete")
        raw = data.detach().cpu().contiguous().view(torch.uint8).numpy()
        if self.written[name] + raw.nbytes > self.sizes[name]:
            raise RuntimeError(f"{name}: more bytes than its shape {self.specs[name][1]} holds")
        self.f.write(memoryview(raw))
        self.written[name] += raw.nbytes

    def check_complete(self) -> None:
        short = {n: (self.written[n], s) for n, s in self.sizes.items() if self.written[n] != s}
        if short:
            raise RuntimeError(f"incomplete tensors (bytes written, expected): {short}")


def _atomic_write(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write(f)`` on a temporary file beside ``out``, then rename it to ``out`` (removed on any failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_prompts(
    model: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    negative: str = WAN_NEGATIVE_PROMPT,
    batch: int = 8,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Encode ``prompts`` (already cleaned, as :func:`read_prompts` returns them) and ``negative`` (cleaned here).

    Writes ``out`` atomically; see the module docstring for its layout. Memory: one batch of encoder states.

    Returns:
        The shapes written: ``{"context": (N, L, D), "negative": (L_neg, D)}``.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise EncodeError("no prompts to encode")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    negative = clean_text(negative)
    d_model, dtype = model.config.d_model, model.shared.weight.dtype
    # a first, cheap pass: the token counts fix L, hence the header, before any state is computed
    length = max(max(_token_counts(tokenizer, prompts[i : i + 1024])) for i in range(0, len(prompts), 1024))
    neg_rows, neg_lens = _encode_batch(model, tokenizer, [negative], TEXT_LEN)
    neg_rows = neg_rows[0, : int(neg_lens[0])].to(dtype)
    shapes = {"context": (len(prompts), length, d_model), "negative": tuple(neg_rows.shape)}
    meta = {
        "format": "salt_ref.encode_prompts",
        "text_len": str(TEXT_LEN),
        "negative_prompt": negative,
        **(metadata or {}),
    }
    truncated = 0

    def write(f: BinaryIO) -> None:
        nonlocal truncated
        st = _StreamingSafetensors(f, {k: (dtype, s) for k, s in shapes.items()}, meta)
        bar = tqdm(total=len(prompts), unit="prompt", desc="encode", disable=not progress)
        for i in range(0, len(prompts), batch):
            rows, lens = _encode_batch(model, tokenizer, prompts[i : i + batch], length)
            if int(lens.max()) > length:  # the two tokenizer passes disagree: rows would be cut silently
                raise RuntimeError(f"prompts {i}..{i + batch - 1}: {int(lens.max())} tokens > the {length} counted")
            truncated += int((lens >= TEXT_LEN).sum())
            st.write("context", rows.to(dtype))
            bar.update(rows.shape[0])
        bar.close()
        st.write("negative", neg_rows)
        st.check_complete()

    _atomic_write(Path(out), write)
    if truncated:
        print(
            f"note: {truncated} prompt(s) hit the {TEXT_LEN}-token limit (longer ones are truncated)", file=sys.stderr
        )
    return shapes


# --------------------------------------------------------------------------------------------------------- CLI

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m salt_ref.encode_prompts",
        description="Encode prompts with Wan 2.1's umT5-XXL into the --prompts file of salt_ref.train.",
    )
    p.add_argument("--wan-dir", help="Wan 2.1 folder (holds the T5 weights and google/umt5-xxl)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output .safetensors (context [N, L, D], negative [L, D])")
    p.add_argument("--negative", default=None, help="negative prompt (default: Wan's sample_neg_prompt)")
    p.add_argument("--batch", type=positive_int, default=8, help="prompts per encoder call")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="encoder and output dtype (Wan: bf16)")
    p.add_argument("--t5", default=None, help=f"T5 weights (default: <wan-dir>/{T5_CHECKPOINT})")
    p.add_argument("--tokenizer", default=None, help=f"tokenizer folder (default: <wan-dir>/{T5_TOKENIZER})")
    p.add_argument("--t5-config", default=None, help="UMT5Config JSON (default: umT5-XXL)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: returns 0, or 2 after one ``error:`` line on stderr."""
    args = _parser().parse_args(argv)
    try:
        if args.wan_dir is not None and not Path(args.wan_dir).is_dir():
            raise EncodeError(f"Wan folder {args.wan_dir} not found")
        if args.wan_dir is None and (args.t5 is None or args.tokenizer is None):
            raise EncodeError("give --wan-dir, or both --t5 and --tokenizer")
        t5 = Path(args.t5) if args.t5 else Path(args.wan_dir) / T5_CHECKPOINT
        tok_dir = Path(args.tokenizer) if args.tokenizer else Path(args.wan_dir) / T5_TOKENIZER
        # cheap checks first: a typo should not cost an 11 GB load
        prompts = read_prompts(args.prompts)
        if not t5.is_file():
            raise EncodeError(f"T5 checkpoint {t5} not found")
        config = load_t5_config(args.t5_config, t5)
        tokenizer = load_tokenizer(tok_dir, config.vocab_size)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_encoder(t5, config, device=device, dtype=_DTYPES[args.dtype])
        negative = WAN_NEGATIVE_PROMPT if args.negative is None else args.negative
        shapes = encode_prompts(
            model,
            tokenizer,
            prompts,
            args.out,
            negative=negative,
            batch=args.batch,
            progress=not args.quiet,
            metadata={"t5": t5.name, "dtype": args.dtype},
        )
    except EncodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: context {list(shapes['context'])}, negative {list(shapes['negative'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reading Wan 2.1 DiT weights from safetensors into :class:`~salt_ref.models.wan.WanModel`.

:func:`load_checkpoint` takes three key layouts: the official Wan checkpoint (the model's own parameter names),
diffusers' ``WanTransformer3DModel`` (mapped with :func:`from_diffusers_keys`; :func:`to_diffusers_keys` is the
other direction) and either of them with ComfyUI's ``model.diffusion_model.`` prefix. The checkpoint is a single
``.safetensors`` file, shards listed by a ``*.safetensors.index.json``, or a folder holding one of the two.
Tensors are read one at a time from the memory-mapped files, so no second full copy of the weights is built;
into an FSDP2-sharded model each rank reads only the rows of its own shard.

A checkpoint is refused with a one-line error when it holds one parameter under two keys, when its index is not
valid or has no ``weight_map``, when it is a pickle (``torch.save``) file, or when it is not a readable
safetensors file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # hints only: wan.py imports this module, so importing it back at run time would be a cycle
    from safetensors import safe_open  # imported when a checkpoint is read, as before the split

    from salt_ref.models.wan import WanConfig, WanModel

__all__ = ["load_checkpoint", "to_diffusers_keys", "from_diffusers_keys", "CheckpointKeyError"]

_COMFY_PREFIX = "model.diffusion_model."
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_PICKLE_ADVICE = (
    "pickle checkpoints are not loaded (loading one can run code); convert {it} to safetensors first "
    "(safetensors.torch.save_file of torch.load(path, weights_only=True))"
)


class CheckpointKeyError(KeyError):
    """A checkpoint's keys or shapes do not match the model; the message names them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------------------------------- key names

# Ordered (official -> diffusers) renames; applied as plain substring replacement, as diffusers' converter.
_DIFFUSERS_RENAMES = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"),  # the cross-attention's affine LayerNorm; the FFN norm has no parameters
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        # match whole dotted components so "self_attn.q" never hits "self_attn.q_something"
        key = re.sub(rf"(^|\.){re.escape(old)}(?=\.|$)", lambda m, n=new: m.group(1) + n, key)
    return key


def to_diffusers_keys(key: str) -> str:
    """Official Wan key -> diffusers ``WanTransformer3DModel`` key."""
    key = _rename(key, [(a, b) for a, b in _DIFFUSERS_RENAMES if a != "norm3"])
    return re.sub(r"(^|\.)norm3(?=\.)", r"\1norm2", key)


def from_diffusers_keys(key: str) -> str:
    """diffusers key -> official Wan key (exact inverse of :func:`to_diffusers_keys` on Wan T2V keys)."""
    inverse = [(b, a) for a, b in reversed(_DIFFUSERS_RENAMES)]
    # "scale_shift_table" at top level is the head's; inside blocks it is the block modulation
    if key == "scale_shift_table":
        return "head.modulation"
    return _rename(key, inverse)


def _is_diffusers_only(name: str) -> bool:
    """``name`` has a component only diffusers uses (``norm2`` alone does not count: official Wan has it too)."""
    mapped = from_diffusers_keys(name)
    return mapped != name and mapped != _rename(name, [("norm2", "norm3")])


# ----------------------------------------------------------------------------------------------- files


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: a u64 little-endian header length, then the JSON header, which opens with "{"
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


def _refuse_pickle(f: Path) -> None:
    """Raise for a pickle (``torch.save``) file, told by its suffix or its first bytes, before safetensors reads it.

    A file whose header is a safetensors header is read as one whatever its name, as before.
    """
    with open(f, "rb") as fh:
        head = fh.read(9)
    if _looks_like_safetensors(head, f.stat().st_size):
        return
    # torch.save writes a zip archive (PK\x03\x04); older torch and plain pickle start with PROTO (\x80, 2..5)
    magic = head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)
    if magic or f.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{f} is a pickle checkpoint: {_PICKLE_ADVICE.format(it='it')}")


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint index {index} is not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"checkpoint index {index} has no 'weight_map' (an object from tensor names to shard file names)"
        )
    return weight_map


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors file(s) of ``path``: a file, an index JSON, or a folder holding either."""
    if path.is_dir():
        idx = sorted(path.glob("*.safetensors.index.json"))
        if idx:
            path = idx[0]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
                if pickles:
                    raise ValueError(
                        f"{path} holds only pickle checkpoints ({', '.join(pickles)}): "
                        f"{_PICKLE_ADVICE.format(it='them')}"
                    )
            if len(files) != 1:
                raise FileNotFoundError(f"{path} holds {len(files)} .safetensors files and no index JSON")
            _refuse_pickle(files[0])
            return files, None
    if path.name.endswith(".index.json"):
        weight_map = _read_weight_map(path)
        files = sorted({path.parent / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards named in {path} are missing: {missing}")
        for f in files:
            _refuse_pickle(f)
        return files, weight_map
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _refuse_pickle(path)
    return [path], None


@contextmanager
def _open(f: Path) -> Iterator[safe_open]:
    """``safe_open(f)``, its header errors turned into one line naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(f), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"checkpoint {f} is not a readable safetensors file ({e})") from e
    with handle as sf:
        yield sf


def _stored_names(path: Path, files: list[Path]) -> dict[str, tuple[Path, str]]:
    """The model's name of every stored tensor -> ``(file, stored key)``; a parameter stored twice is refused.

    Twice means an official key and its diffusers twin, a key with and without the ComfyUI prefix, or one key
    in two shards: which copy would load depended on the reading order, so none is chosen.
    """
    raw: list[tuple[str, Path, str]] = []
    for f in files:
        with _open(f) as sf:
            raw.extend((k.removeprefix(_COMFY_PREFIX), f, k) for k in sf.keys())
    # Decided from all shards together: one shard may hold only keys named alike in both layouts. Each key then
    # maps by itself (from_diffusers_keys leaves official names as they are), so in a checkpoint mixing the
    # layouts an official key and its diffusers twin land on one name; without any diffusers-only name nothing
    # is renamed (norm2 alone is official Wan's FFN norm, not diffusers' cross-attention norm).
    diffusers = any(_is_diffusers_only(n) for n, _, _ in raw)
    copies: dict[str, list[tuple[Path, str]]] = {}
    for n, f, k in raw:
        copies.setdefault(from_diffusers_keys(n) if diffusers else n, []).append((f, k))
    twice = {name: fks for name, fks in copies.items() if len(fks) > 1}
    if twice:
        base = path if path.is_dir() else path.parent

        def where(fks: list[tuple[Path, str]]) -> str:
            one_file = len({f for f, _ in fks}) == 1
            return " and ".join(repr(k) if one_file else f"{k!r} in {_relative(f, base)}" for f, k in fks)

        listed = "; ".join(f"{name} as {where(fks)}" for name, fks in sorted(twice.items())[:10])
        more = f" (and {len(twice) - 10} more)" if len(twice) > 10 else ""
        n = len(twice)
        raise CheckpointKeyError(
            f"checkpoint {path} stores {n} parameter{'s' if n > 1 else ''} under more than one key (which copy "
            f"would load is ambiguous): {listed}{more}"
        )
    return {name: fks[0] for name, fks in copies.items()}


def _relative(f: Path, base: Path) -> str:
    try:
        return str(f.relative_to(base))
    except ValueError:
        return str(f)


# ------------------------------------------------------------------------------------------------ load


def load_checkpoint(model: WanModel, path: str | Path, *, strict: bool = True) -> dict[str, list[str]]:
    """Load official-layout or diffusers-layout Wan weights (single file, shards + index, or folder).

    Tensors are read one at a time from memory-mapped safetensors and copied into the model's parameters,
    so no second full copy of the weights is materialised; into an FSDP2-sharded model each rank reads only
    the rows of its own shard. Keys may carry the ComfyUI prefix
    ``model.diffusion_model.``. With ``strict`` a mismatch raises :class:`CheckpointKeyError` naming the
    missing keys, unexpected keys and differing shapes; otherwise they are returned.

    Whatever ``strict``, a parameter stored under two keys raises :class:`CheckpointKeyError`, and a pickle
    file, an index without ``weight_map`` or a file that is not safetensors raises ``ValueError``.
    """
    files, _ = _checkpoint_files(Path(path))
    own = model.state_dict()
    seen = _stored_names(Path(path), files)
    missing = sorted(set(own) - set(seen))
    unexpected = sorted(set(seen) - set(own))
    shapes = []
    for name in sorted(set(own) & set(seen)):
        f, k = seen[name]
        with _open(f) as sf:
            shape = tuple(sf.get_slice(k).get_shape())
        if shape != tuple(own[name].shape):
            shapes.append(f"{name}: checkpoint {shape} vs model {tuple(own[name].shape)}")
    report = {"missing": missing, "unexpected": unexpected, "shape_mismatch": shapes}
    if strict and (missing or unexpected or shapes):
        raise CheckpointKeyError(
            f"checkpoint {path} does not match WanModel({_short(model.config)}): "
            f"{len(missing)} missing {missing[:20]}, {len(unexpected)} unexpected {unexpected[:20]}, "
            f"shape mismatches {shapes[:20]}"
        )
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name in set(own) & set(seen):
        if not any(s.startswith(name + ":") for s in shapes):
            by_file.setdefault(seen[name][0], []).append((name, seen[name][1]))
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for f, pairs in by_file.items():
            with _open(f) as sf:
                for name, k in pairs:
                    target = params[name]
                    if target.is_meta:
                        raise ValueError(f"{name} is on the meta device: materialise the model (to_empty) first")
                    if hasattr(target, "to_local"):  # an FSDP2 shard: read only this rank's rows
                        target.to_local().copy_(_local_rows(sf.get_slice(k), target).to(target.dtype))
                    else:
                        target.copy_(sf.get_tensor(k).to(target.dtype))
    return report


def _local_rows(tensor_slice, dtensor) -> Tensor:
    """This rank's dim-0 chunk of a stored tensor (FSDP2 ``Shard(0)``: ``torch.chunk`` rows), read lazily."""
    from torch.distributed.tensor import Shard

    if len(dtensor.placements) != 1 or not isinstance(dtensor.placements[0], Shard) or dtensor.placements[0].dim:
        raise ValueError(f"only FSDP2's 1-D Shard(0) layout is supported, got {dtensor.placements}")
    n_rows = tensor_slice.get_shape()[0]
    world, rank = dtensor.device_mesh.size(), dtensor.device_mesh.get_local_rank()
    per = -(-n_rows // world)  # ceil: torch.chunk's chunk size
    start, stop = min(rank * per, n_rows), min((rank + 1) * per, n_rows)
    return tensor_slice[start:stop]


def _short(cfg: WanConfig) -> str:
    return f"dim={cfg.dim}, layers={cfg.num_layers}, heads={cfg.num_heads}, ffn={cfg.ffn_dim}, in={cfg.in_dim}"

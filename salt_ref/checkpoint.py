r"""Training state in one safetensors file, written atomically, readable back bit for bit.

A state is a flat ``{name: tensor}`` map plus a JSON header (safetensors metadata ``{"salt_ref": json}``).
Module weights go in as ``"<prefix>.<param name>"``; an optimizer's per-parameter tensors as
``"<prefix>.state.<index>.<key>"`` with its ``param_groups`` in the header; RNG states as uint8 tensors.
Writes go to a temporary file in the same directory, are flushed to disk, then ``os.replace``d over the
target, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointMismatchError",
    "save_atomic",
    "load_state",
    "read_header",
    "module_tensors",
    "load_module_tensors",
    "optimizer_tensors",
    "load_optimizer_tensors",
]

_META_KEY = "salt_ref"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model, optimizer or config it is loaded into."""


def save_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON ``header`` to ``path`` via temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views and shared storage; a contiguous clone per tensor is cheap at toy scale.
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={_META_KEY: json.dumps(header)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint without loading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise CheckpointMismatchError(f"{path} is not a salt_ref training checkpoint (no '{_META_KEY}' header)")
    return json.loads(meta[_META_KEY])


def load_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, header)`` of a checkpoint written by :func:`save_atomic`."""
    return load_file(str(path)), read_header(path)


def module_tensors(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(prefix: str, module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``"<prefix>.*"`` entries strictly; a mismatch names the missing/unexpected keys and shapes."""
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(own[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(own) & set(expected))
        if own[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"'{prefix}' does not match the checkpoint: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {shapes}"
        )
    module.load_state_dict(own, strict=True)


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten an optimizer: per-parameter tensors, and a JSON-able header (groups and non-tensor state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{prefix}.state.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(
    prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], header: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix + ".state."):
            idx, key = name[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = val
    for name, val in header.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    groups = header["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})

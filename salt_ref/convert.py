r"""Student checkpoints in and out: released pickles to safetensors, and a trained run's EMA student to safetensors.

Usage::

    python -m salt_ref.convert import SRC.pt --out student.safetensors \
        [--which generator|generator_ema|model|state_dict] [--model 1.3B|tiny|14B] [--causal true] [--dtype bf16|fp32]
    python -m salt_ref.convert export RUN_DIR --out student_ema.safetensors \
        [--which ema|generator] [--model 1.3B|tiny|14B] [--causal true] [--dtype bf16|fp32]

Both write one safetensors file with the official Wan key names, which
:func:`~salt_ref.models.wan_weights.load_checkpoint` reads (``--student`` of ``salt_ref.full`` takes it). The file
is written to a temporary name in the target folder and renamed over ``--out``, so a failed conversion leaves an
older file intact. Tensors keep their stored dtype unless ``--dtype`` is given.

**Share the exported file, not the run folder.** A safetensors file holds tensors and a JSON header and loads no
code; a ``torch.distributed.checkpoint`` folder is trusted input to ``--resume`` (DCP unpickles its
``.metadata`` there, see :class:`~salt_ref.checkpoint.DCPCheckpointer`). ``export`` itself reads that pickle
with the restricted unpickler below, so exporting a folder from elsewhere runs no code.

**import** reads a ``torch.save`` file with ``torch.load(weights_only=True)`` only: a file that needs
``weights_only=False`` (it pickles other objects, which could run code when loaded) is refused. Layouts read:

- a bare state dict (a top-level dict of tensors);
- a dict of entries, as Self-Forcing's and Salt's trainers save: ``{"generator": ..., "critic": ...,
  "generator_ema": ...}`` (``generator_ema`` only once the EMA has started; ``ode_init.pt`` holds ``generator``
  only), or one entry ``"model"`` / ``"state_dict"``. Without ``--which`` the first present of ``generator_ema``,
  ``generator``, ``model``, ``state_dict`` is taken, and the choice is printed;
- key names with the wrapper components ``model.`` (Self-Forcing's ``WanDiffusionWrapper.model``),
  ``_fsdp_wrapped_module.`` (FSDP1; its EMA shadow keeps them), ``_checkpoint_wrapped_module.`` (activation
  checkpointing) and ``_orig_mod.`` (``torch.compile``) anywhere in the name, in any order and number; ComfyUI's
  ``model.diffusion_model.`` prefix; official Wan or diffusers (``WanTransformer3DModel``) names;
- RoPE tables stored as tensors (``freqs``, ``rope.freqs_cos`` ...) are dropped: they are recomputed, not weights.
  Any other key the model does not have is refused.

**export** reads a run directory of this package:

- ``RUN_DIR/checkpoint/`` (``salt_ref.full``, :class:`~salt_ref.checkpoint.DCPCheckpointer`): a
  ``torch.distributed.checkpoint`` folder with entries ``generator``, ``ema``, ``critic``, ``opt_gen``,
  ``opt_critic`` and ``meta.json``. Only the chosen entry's tensors are read, in one process without a process
  group; the model shape defaults to ``meta.json``'s ``config.student``. The folder's ``.metadata`` pickle is
  read with an unpickler that allows only DCP's own metadata classes;
- ``RUN_DIR/checkpoint.safetensors`` (small runs, :class:`~salt_ref.checkpoint.SafetensorsCheckpointer`): flat
  ``ema.<param>`` / ``generator.<param>`` / ``opt_gen.*`` tensors plus a JSON header; the model shape defaults to
  the toy video setup stored in the header (``config.small``).

``RUN_DIR`` may also be the checkpoint folder or file itself. ``--model`` overrides the stored shape.

Before anything is written, the names and shapes are checked against
``WanModel(WanConfig.preset(model, causal=causal))`` built on the meta device; a mismatch is one error naming the
missing and unexpected keys (the first 20 of each, with counts) and the differing shapes. Every failure (a
missing file, a file that is not a checkpoint, an unknown ``--which``, mismatched keys) is one ``error:`` line
and exit code 2.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from salt_ref.cli import Parser, boolean
from salt_ref.models.wan import PRESETS, WanConfig, WanModel, from_diffusers_keys

__all__ = [
    "ConvertError",
    "ENTRIES",
    "WRAPPER_COMPONENTS",
    "NON_WEIGHT_KEYS",
    "clean_key",
    "official_names",
    "pick_entry",
    "import_checkpoint",
    "export_run",
    "main",
]

# Default preference when --which is not given: the EMA first (what Self-Forcing's `inference.py --use_ema` and
# demo load), then the raw generator (ode_init.pt), then the generic names its loader also accepts.
ENTRIES = ("generator_ema", "generator", "model", "state_dict")
# Dotted components that wrappers insert into parameter names; WanModel has no component of these names, so they
# can be removed wherever they occur.
WRAPPER_COMPONENTS = frozenset({"model", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
# Tensors some Wan implementations store that are not weights: RoPE tables, recomputed by WanModel at build time.
NON_WEIGHT_KEYS = frozenset({"freqs", "rope.freqs", "rope.freqs_cos", "rope.freqs_sin"})
_COMFY = "diffusion_model"  # ComfyUI: model.diffusion_model.<official key>; "model" is a wrapper component
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_RUN_ENTRIES = ("ema", "generator")
_SMALL_CHECKPOINT = "checkpoint.safetensors"  # salt_ref.checkpoint.CHECKPOINT_NAME
_FULL_CHECKPOINT = "checkpoint"  # the DCPCheckpointer folder salt_ref.full writes under --out
_LISTED = 20


class ConvertError(ValueError):
    """A conversion was refused; the message is one line saying why."""


# ---------------------------------------------------------------------------------------------- key names


def clean_key(key: str) -> str:
    """``key`` without wrapper components and without ComfyUI's ``diffusion_model.`` prefix.

    ``model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.self_attn.q.weight`` ->
    ``blocks.0.self_attn.q.weight``.
    """
    parts = [p for p in key.split(".") if p not in WRAPPER_COMPONENTS]
    if parts[:1] == [_COMFY]:
        parts = parts[1:]
    return ".".join(parts)


def _diffusers_named(key: str) -> bool:
    """``key`` has a name only diffusers uses: ``norm2`` alone does not count, official Wan has one too."""
    mapped = from_diffusers_keys(key)
    return mapped not in (key, re.sub(r"(^|\.)norm2(?=\.|$)", r"\1norm3", key))


def official_names(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """Official Wan name -> stored key for every stored key, and the stored keys dropped as non-weights.

    Wrapper components are removed (:func:`clean_key`); a checkpoint with any diffusers-only name is mapped
    with :func:`~salt_ref.models.wan_weights.from_diffusers_keys` as a whole. Two stored keys landing on one
    name (say ``model.x`` and ``x``) are refused: which copy is meant is not knowable.
    """
    cleaned = {k: clean_key(k) for k in keys}
    if any(not c for c in cleaned.values()):
        raise ConvertError(f"keys that are only wrapper components: {[k for k, c in cleaned.items() if not c][:5]}")
    diffusers = any(_diffusers_named(c) for c in cleaned.values())
    names: dict[str, list[str]] = {}
    dropped = []
    for k, c in cleaned.items():
        name = from_diffusers_keys(c) if diffusers else c
        if name in NON_WEIGHT_KEYS:
            dropped.append(k)
            continue
        names.setdefault(name, []).append(k)
    twice = {n: ks for n, ks in names.items() if len(ks) > 1}
    if twice:
        shown = "; ".join(f"{n} as {ks}" for n, ks in sorted(twice.items())[:_LISTED])
        raise ConvertError(f"{len(twice)} parameters are stored under more than one key (ambiguous): {shown}")
    return {n: ks[0] for n, ks in names.items()}, dropped


# ------------------------------------------------------------------------------------------- model check


def _describe(cfg: WanConfig) -> str:
    for name, p in PRESETS.items():
        if replace(p, causal=cfg.causal, chunk_frames=cfg.chunk_frames) == cfg:
            return name
    return f"dim={cfg.dim}, layers={cfg.num_layers}, heads={cfg.num_heads}, in={cfg.in_dim}, patch={cfg.patch_size}"


def _expected_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    # the meta device: names and shapes of a 14B model without allocating its weights
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(
    cfg: WanConfig, names: dict[str, str], shapes: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, tuple[int, ...]]:
    """Refuse unless ``names`` (official name -> stored key, stored shapes in ``shapes``) fit ``WanModel(cfg)``."""
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in names]
    unexpected = sorted(names[n] for n in names if n not in expected)
    differ = [
        f"{n}: stored {shapes[names[n]]} vs model {expected[n]}"
        for n in expected
        if n in names and tuple(shapes[names[n]]) != expected[n]
    ]
    if missing or unexpected or differ:
        raise ConvertError(
            f"{what} does not match WanModel({_describe(cfg)}): {len(missing)} missing {missing[:_LISTED]}, "
            f"{len(unexpected)} unexpected {unexpected[:_LISTED]}, {len(differ)} shape mismatches {differ[:_LISTED]}"
        )
    return expected


def _preset(model: str, causal: bool) -> WanConfig:
    try:
        return WanConfig.preset(model, causal=causal)
    except ValueError as e:
        raise ConvertError(str(e)) from None


# ------------------------------------------------------------------------------------------------ output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(out: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write ``tensors`` to ``out`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "salt_ref.convert": json.dumps(info)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a weights file is as readable as any other
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _outgoing(
    tensors: dict[str, Tensor], names: dict[str, str], order: list[str], dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """Official name -> tensor in the model's order, cast if asked, one storage per tensor (safetensors needs it)."""
    out, seen = {}, set()
    for n in order:
        t = tensors[names[n]].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        storage = t.untyped_storage()
        # views into a shared storage (a flat FSDP buffer, a tied weight) are refused by safetensors: copy those
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[n] = t
    return out


def _summary(out: Path, tensors: dict[str, Tensor]) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    n_params = sum(t.numel() for t in tensors.values())
    return f"wrote {out}: {len(tensors)} tensors, {n_params:,} parameters, {'/'.join(dtypes)}"


def _same_file(a: Path, b: Path) -> bool:
    return b.exists() and a.exists() and os.path.samefile(a, b)


# ------------------------------------------------------------------------------------------------ import


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # a u64 little-endian header length, then the JSON header, which opens with "{"
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


def _load_pickle(src: Path) -> Any:
    """``torch.load(src, weights_only=True)``; what it refuses or cannot read becomes one :class:`ConvertError`."""
    if not src.is_file():
        raise ConvertError(f"no checkpoint file at {src}")
    with open(src, "rb") as f:
        head = f.read(9)
    if _looks_like_safetensors(head, src.stat().st_size):
        raise ConvertError(
            f"{src} is a safetensors file already: salt_ref.models.wan.load_checkpoint reads it as it is "
            "(official, diffusers or ComfyUI names)"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; whether the load succeeds is what matters
            warnings.simplefilter("ignore")
            # mmap (zip-format files only): a 14B checkpoint is not copied into memory before it is written out
            return torch.load(src, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04"))
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        if "Weights only load failed" not in text:
            raise ConvertError(f"{src} is not a torch checkpoint ({' '.join(text.split())[:200]})") from None
        found = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        detail = " ".join((found.group(1) if found else "").split())[:200]
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save's zip, or a pickle PROTO
        if glob is None and (not pickled or "Unsupported operand" in detail):
            raise ConvertError(f"{src} is not a torch checkpoint (the unpickler says: {detail})") from None
        what = f"it pickles {glob.group(1)}, which" if glob else f"it holds something ({detail}) that"
        raise ConvertError(
            f"{src} cannot be loaded with torch.load(weights_only=True): {what} would load only with "
            "weights_only=False, and that can run arbitrary code, so it is not loaded (re-save its state dicts "
            "as plain tensors where the file is trusted)"
        ) from None
    except (EOFError, KeyError, RuntimeError, ValueError, OSError) as e:  # what torch.load raises on other bytes
        raise ConvertError(f"{src} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def pick_entry(obj: Any, which: str | None, src: str = "checkpoint") -> tuple[str | None, dict[str, Tensor]]:
    """``(entry name or None for a bare state dict, state dict)`` of a loaded checkpoint.

    Without ``which`` the first present of :data:`ENTRIES` is taken. A ``which`` that the file does not hold
    (or a bare state dict, which holds no entries) is refused, naming what the file holds.
    """
    if not isinstance(obj, dict):
        raise ConvertError(f"{src} holds a {type(obj).__name__}, not a state dict")
    if _tensor_dict(obj):
        if which is not None:
            raise ConvertError(f"{src} is a bare state dict with no {which!r} entry: leave out --which")
        return None, obj
    held = sorted(str(k) for k in obj)
    if which is not None and which not in obj:
        raise ConvertError(f"{src} has no {which!r} entry; it holds {held}")
    name = which if which is not None else next((k for k in ENTRIES if k in obj), None)
    if name is None:
        raise ConvertError(
            f"{src} is not a model checkpoint: no tensors at top level and none of {list(ENTRIES)}; it holds {held}"
        )
    if not _tensor_dict(obj[name]):
        raise ConvertError(f"{src}[{name!r}] is not a state dict (a dict of named tensors)")
    return name, obj[name]


def import_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str | None = None,
    model: str = "1.3B",
    causal: bool = True,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert a released ``torch.save`` checkpoint to an official-key safetensors file; see the module docs.

    Returns ``{"entry", "dropped", "tensors"}``: the entry taken (``None`` for a bare state dict), the stored
    keys dropped as non-weights and the number of tensors written.
    """
    src, out = Path(src), Path(out)
    if _same_file(src, out):
        raise ConvertError(f"--out {out} is the source file itself: choose another path")
    cfg = _preset(model, causal)
    obj = _load_pickle(src)
    name, sd = pick_entry(obj, which, str(src))
    what = f"{src}[{name!r}]" if name else str(src)
    if name is not None:
        log(f"picked {name!r} of {sorted(str(k) for k in obj)} in {src}")
    names, dropped = official_names(list(sd))
    if dropped:
        log(f"dropped {len(dropped)} non-weight tensors (RoPE tables): {dropped[:_LISTED]}")
    order = list(_check(cfg, names, {k: tuple(v.shape) for k, v in sd.items()}, what))
    tensors = _outgoing(sd, names, order, dtype)
    _write(out, tensors, {"source": str(src), "entry": name, "model": _describe(cfg)})
    log(_summary(out, tensors))
    return {"entry": name, "dropped": dropped, "tensors": len(tensors)}


# ------------------------------------------------------------------------------------------------ export


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file allowing only what DCP metadata is made of.

    torch's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which would run whatever a crafted
    file names; reading the file here first, with this allowlist, refuses such a file before torch opens it.
    """

    _PATHS = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # a dotted name reaches attributes (methods, __class__) of an allowed class
            if module == "torch.distributed.checkpoint.metadata" or (module, name) == (
                "torch.distributed.checkpoint.filesystem",
                "_StorageInfo",
            ):
                obj = super().find_class(module, name)
                if isinstance(obj, type):  # its dataclasses and enums, never a function
                    return obj
            elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
                return getattr(torch, name)
            elif (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} or (
                module == "pathlib" and name in self._PATHS
            ):  # _get_layout looks a layout up by its name; paths and dicts only hold data
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of torch.distributed.checkpoint metadata")


def _dcp_metadata(folder: Path) -> Any:
    """The checkpoint's DCP ``Metadata``, every ``*.metadata`` file of the folder read with the allowlist."""
    files = sorted(folder.glob("*.metadata"))
    if not files:
        raise ConvertError(f"{folder} has no .metadata file: not a torch.distributed.checkpoint folder")
    loaded = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                loaded[f.name] = _DCPMetadataUnpickler(fh).load()
        except Exception as e:  # pickle, EOF, attribute and constructor errors of a damaged or crafted file
            raise ConvertError(f"{f} is not torch.distributed.checkpoint metadata this reader accepts ({e})") from None
    md = loaded.get(".metadata", loaded[files[0].name])
    if not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise ConvertError(f"{files[0]} is not torch.distributed.checkpoint metadata (no state_dict_metadata)")
    return md


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return data


def _config_from_dict(data: Any, where: str) -> WanConfig:
    """A :class:`WanConfig` from its ``to_dict()`` as stored in JSON (lists back to tuples)."""
    if not isinstance(data, dict):
        raise ConvertError(f"{where} is not a WanConfig dict")
    known = {f.name for f in fields(WanConfig)}
    try:
        return WanConfig(**{k: tuple(v) if k == "patch_size" else v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where} is not a valid WanConfig ({e}): pass --model") from None


def _small_run_config(config: dict[str, Any], where: str) -> WanConfig | None:
    """The student shape of a small toy-video run from its stored fingerprint, ``None`` if it records none."""
    if "toy" in config:
        raise ConvertError(f"{where} is a 2D toy run: its networks are MLPs, not Wan models")
    if "small" not in config:
        return None
    from toy.setup_video import SmallVideoConfig, model_config  # only small runs need the toy package

    return model_config(SmallVideoConfig.from_dict(config["small"], source=where), causal=True)


def _locate(run: Path) -> tuple[str, Path]:
    """``("dcp" | "safetensors", path)`` of the checkpoint in a run directory (or the checkpoint itself)."""
    if not run.exists():
        raise ConvertError(f"no run directory at {run}")
    if run.is_file():
        return "safetensors", run
    if (run / "meta.json").is_file():
        return "dcp", run
    dcp, small = run / _FULL_CHECKPOINT, run / _SMALL_CHECKPOINT
    has_dcp, has_small = (dcp / "meta.json").is_file(), small.is_file()
    if has_dcp and has_small:
        raise ConvertError(f"{run} holds both {dcp} and {small}: pass the one to export as RUN_DIR")
    if has_dcp:
        return "dcp", dcp
    if has_small:
        return "safetensors", small
    unfinished = f" ({dcp} has no meta.json: an unfinished save)" if dcp.is_dir() else ""
    raise ConvertError(
        f"{run} holds no checkpoint: expected {_FULL_CHECKPOINT}/meta.json (salt_ref.full) or {_SMALL_CHECKPOINT} "
        f"(a small run){unfinished}"
    )


def _resolve(model: str | None, causal: bool, stored: WanConfig | None, where: str) -> WanConfig:
    if model is not None:  # an explicit --model wins; the shape check below still compares it with the tensors
        return _preset(model, causal)
    if stored is None:
        raise ConvertError(f"{where} does not record the student's shape: pass --model ({', '.join(PRESETS)})")
    return stored


def _export_dcp(folder: Path, which: str, model: str | None, causal: bool) -> tuple[WanConfig, dict[str, Tensor], Any]:
    """Official name -> tensor of ``which`` in a DCP folder, read in this process (no process group) and only them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _read_json(folder / "meta.json")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    stored = _config_from_dict(config["student"], f"{folder}/meta.json config.student") if "student" in config else None
    cfg = _resolve(model, causal, stored, f"{folder}/meta.json")
    md = _dcp_metadata(folder)
    prefix = which + "."
    entries = {
        k[len(prefix) :]: v
        for k, v in md.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }
    if not entries:
        held = sorted({k.split(".", 1)[0] for k in md.state_dict_metadata})
        raise ConvertError(f"{folder} holds no {which!r} tensors; its entries are {held}")
    names, _ = official_names(list(entries))
    order = list(_check(cfg, names, {k: tuple(v.size) for k, v in entries.items()}, f"{folder}[{which!r}]"))
    # Plain CPU tensors of the stored sizes and dtypes: DCP assembles each from its saved shards (FSDP2 DTensor
    # rows included), reading only these keys, so the optimizer states and the critic stay on disk.
    targets = {
        names[n]: torch.empty(tuple(entries[names[n]].size), dtype=entries[names[n]].properties.dtype) for n in order
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": single-process is the intent
            dcp.load({which: targets}, checkpoint_id=str(folder), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        why = " ".join(str(e).split())[:300]
        raise ConvertError(f"{folder} could not be read ({type(e).__name__}: {why})") from None
    return cfg, {n: targets[names[n]] for n in order}, meta.get("iteration")


def _export_safetensors(
    path: Path, which: str, model: str | None, causal: bool
) -> tuple[WanConfig, dict[str, Tensor], Any]:
    """Official name -> tensor of the ``<which>.<param>`` entries of a small run's ``checkpoint.safetensors``."""
    from safetensors import SafetensorError, safe_open

    from salt_ref.checkpoint import CheckpointMismatchError, read_header

    try:
        header = read_header(path)
    except CheckpointMismatchError as e:
        raise ConvertError(str(e)) from None
    except SafetensorError as e:
        raise ConvertError(f"{path} is not a readable safetensors file ({e})") from None
    config = header.get("config") if isinstance(header.get("config"), dict) else {}
    cfg = _resolve(model, causal, _small_run_config(config, str(path)), str(path))
    prefix = which + "."
    with safe_open(str(path), framework="pt") as f:
        keys = [k[len(prefix) :] for k in f.keys() if k.startswith(prefix)]
        if not keys:
            held = sorted({k.split(".", 1)[0] for k in f.keys()})
            raise ConvertError(f"{path} holds no {which!r} tensors; its entries are {held}")
        names, _ = official_names(keys)
        shapes = {k: tuple(f.get_slice(prefix + k).get_shape()) for k in keys}
        order = list(_check(cfg, names, shapes, f"{path}[{which!r}]"))
        tensors = {n: f.get_tensor(prefix + names[n]) for n in order}
    return cfg, tensors, header.get("iteration")


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "ema",
    model: str | None = None,
    causal: bool = True,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write a trained run's ``ema`` (or ``generator``) student as an official-key safetensors file.

    ``run_dir`` is a run directory of ``salt_ref.full`` (``checkpoint/``, DCP) or of a small run
    (``checkpoint.safetensors``), or either checkpoint itself. ``model`` (a preset name) overrides the shape the
    run records. Returns ``{"kind", "iteration", "tensors"}``.
    """
    if which not in _RUN_ENTRIES:
        raise ConvertError(f"--which must be one of {list(_RUN_ENTRIES)}, got {which!r}")
    kind, path = _locate(Path(run_dir))
    out = Path(out)
    if _same_file(path, out):
        raise ConvertError(f"--out {out} is the run's checkpoint itself: choose another path")
    read = _export_dcp if kind == "dcp" else _export_safetensors
    cfg, stored, iteration = read(path, which, model, causal)
    tensors = _outgoing(stored, {n: n for n in stored}, list(stored), dtype)
    info = {"source": str(path), "entry": which, "iteration": iteration, "model": _describe(cfg)}
    _write(out, tensors, info)
    log(f"read {which!r} of {path} ({kind}, iteration {iteration})")
    log(_summary(out, tensors))
    return {"kind": kind, "iteration": iteration, "tensors": len(tensors)}


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> Parser:
    p = Parser(prog="python -m salt_ref.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{import,export}")
    imp = sub.add_parser("import", help="a released torch.save checkpoint (.pt) -> official-key safetensors")
    imp.add_argument("src", help="the .pt file (Self-Forcing / Salt release, or a bare state dict)")
    imp.add_argument("--which", choices=ENTRIES, default=None, help="entry to convert (default: the EMA if present)")
    imp.add_argument("--model", choices=list(PRESETS), default="1.3B", help="WanModel preset to check against")
    exp = sub.add_parser("export", help="a trained run's EMA student -> official-key safetensors")
    exp.add_argument("run_dir", help="run directory (checkpoint/ of salt_ref.full, or checkpoint.safetensors)")
    exp.add_argument("--which", choices=_RUN_ENTRIES, default="ema", help="the EMA (default) or the raw generator")
    exp.add_argument("--model", choices=list(PRESETS), default=None, help="preset (default: the run's own shape)")
    for s in (imp, exp):
        s.add_argument("--out", required=True, help="output .safetensors file (replaced atomically)")
        s.add_argument("--causal", type=boolean, default=True, help="build the check model causal (default true)")
        s.add_argument("--dtype", choices=list(_DTYPES), default=None, help="cast (default: keep the stored dtype)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 after one ``error:`` line)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse's own exits (--help, a bad flag) come back as codes too
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    try:
        if args.command == "import":
            import_checkpoint(args.src, args.out, which=args.which, model=args.model, causal=args.causal, dtype=dtype)
        else:
            export_run(args.run_dir, args.out, which=args.which, model=args.model, causal=args.causal, dtype=dtype)
    except (ValueError, OSError) as e:  # ConvertError, and what the file system says about a path
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

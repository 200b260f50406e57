r"""Training checkpoints: the safetensors format, and the two checkpointers the loop saves and resumes through.

**Format.** A state is a flat ``{name: tensor}`` map plus a JSON header (safetensors metadata ``{"salt_ref": json}``).
Module weights go in as ``"<prefix>.<param name>"``; an optimizer's per-parameter tensors as
``"<prefix>.state.<index>.<key>"`` with its ``param_groups`` in the header; RNG states as uint8 tensors.
Writes go to a temporary file in the same directory, are flushed to disk, then ``os.replace``d over the
target, so a run killed mid-write leaves the previous checkpoint intact (and the next save removes the leftover
``.<name>.*.tmp``). The file gets the permissions of any other output (``0666`` less the umask).

**Integrity.** The header stores a SHA-256 of every tensor's bytes (``"checksums"``), and the metadata a SHA-256
of the header itself (``"salt_ref.sha256"``), so :func:`load_state` and :func:`read_header` detect a truncated
file, a flipped byte in a weight, or an edited header (say, another iteration number), and raise
:class:`CheckpointDamagedError` naming the file and what failed. A checkpoint written before checksums existed
(neither field) still loads. A write that fails for lack of space raises :class:`CheckpointWriteError` with the
folder and the bytes needed; the previous checkpoint is intact.

**Checkpointers** (:class:`Checkpointer`): :class:`SafetensorsCheckpointer` writes one such file per run (single
process); :class:`DCPCheckpointer` writes a sharded ``torch.distributed.checkpoint`` folder under FSDP2. Both
store the run's *fingerprint* (what must stay equal on resume) and refuse to load into a run with another one,
naming every differing field with both values.

This module does not import :mod:`salt_ref.loop`: the loop's training state reaches the checkpointers by duck
typing (see :class:`Checkpointer`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointMismatchError",
    "CheckpointDamagedError",
    "CheckpointWriteError",
    "Checkpointer",
    "SafetensorsCheckpointer",
    "DCPCheckpointer",
    "save_atomic",
    "check_setup_part",
    "tensor_checksum",
    "load_state",
    "read_header",
    "module_tensors",
    "load_module_tensors",
    "optimizer_tensors",
    "load_optimizer_tensors",
    "rank_and_world",
    "barrier",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
_META_KEY = "salt_ref"
_SUM_KEY = "salt_ref.sha256"  # metadata key of the header's own checksum
_NO_COPY = "there is no earlier copy: start the run again with --overwrite instead of --resume, or use another --out"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model, optimizer or config it is loaded into."""


class CheckpointDamagedError(CheckpointMismatchError):
    """A checkpoint file is truncated, corrupt or edited (a failed checksum); the message names what failed."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left); the previous checkpoint, if any, is intact."""


def _damaged(path: str | os.PathLike, reason: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"checkpoint {path} is damaged ({reason}); {_NO_COPY}")


def tensor_checksum(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (hex): what the header stores per tensor."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _header_checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(path: Path) -> None:
    """Delete ``.<name>.*.tmp`` files a killed writer left beside ``path`` (callers hold the run lock)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def save_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON ``header`` to ``path`` via temp file + fsync + rename.

    The header gains ``"checksums"`` (one :func:`tensor_checksum` per tensor) and the metadata the header's own
    SHA-256. Raises :class:`CheckpointWriteError` (naming the folder and the bytes needed) when the disk is full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    # safetensors refuses views and shared storage; a contiguous clone per tensor is cheap at toy scale.
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    text = json.dumps({**header, "checksums": {k: tensor_checksum(v) for k, v in flat.items()}})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={_META_KEY: text, _SUM_KEY: _header_checksum(text)})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the run's other outputs are 0644
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        no_space = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
            isinstance(e, SafetensorError) and "No space left" in str(e)
        )
        if no_space:
            need = sum(v.numel() * v.element_size() for v in flat.values()) + len(text)
            free = shutil.disk_usage(path.parent).free
            kept = (
                f"the previous checkpoint {path} is intact; free some space and continue with --resume"
                if path.exists()
                else "nothing was written; free some space and run again"
            )
            err = CheckpointWriteError(
                f"no space left on device in {path.parent}: a checkpoint needs about {need} bytes, {free} are free; "
                + kept
            )
            err.errno = errno.ENOSPC
            raise err from None
        raise


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of ``path``; a file safetensors cannot parse is :class:`CheckpointDamagedError`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise _damaged(path, f"not a readable safetensors file: {e}") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _damaged(path, f"cannot be read: {e}") from None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint without loading its tensors (its own checksum verified)."""
    meta = _metadata(path)
    if _META_KEY not in meta:
        raise CheckpointMismatchError(f"{path} is not a salt_ref training checkpoint (no '{_META_KEY}' header)")
    text = meta[_META_KEY]
    if _SUM_KEY in meta and meta[_SUM_KEY] != _header_checksum(text):
        raise _damaged(path, "its header fails its checksum: it was edited or corrupted")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise _damaged(path, f"its header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    if (_SUM_KEY in meta) != ("checksums" in header):  # a checksum-era file lost one of its two checksums
        raise _damaged(path, "a checksum is missing from its header")
    return header


def load_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, header)`` of a checkpoint written by :func:`save_atomic`, every tensor's checksum verified."""
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise _damaged(path, f"its tensors cannot be read: {e}") from None
    sums = header.get("checksums")
    if sums is not None:
        if set(sums) != set(tensors):
            missing, extra = sorted(set(sums) - set(tensors)), sorted(set(tensors) - set(sums))
            raise _damaged(path, f"tensors missing {missing[:4]}, unexpected {extra[:4]}")
        for name, t in tensors.items():
            if tensor_checksum(t) != sums[name]:
                raise _damaged(path, f"tensor {name!r} fails its checksum")
    return tensors, header


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


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is up; nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_MISSING = object()
_MAX_LISTED = 8  # differing fields named in a refused resume; the rest are counted


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict is a leaf."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(v: Any) -> str:
    return "absent" if v is _MISSING else repr(v)


def _check_fingerprint(path: Path, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Refuse a resume whose fingerprint differs, naming each differing leaf field with both values."""
    if theirs == ours:
        return
    flat_theirs, flat_ours = _flatten(theirs), _flatten(ours)
    keys = list(flat_ours) + [k for k in flat_theirs if k not in flat_ours]  # the run's order, then the extra ones
    diffs = [
        f"{k}: checkpoint {_shown(flat_theirs.get(k, _MISSING))}, now {_shown(flat_ours.get(k, _MISSING))}"
        for k in keys
        if flat_theirs.get(k, _MISSING) != flat_ours.get(k, _MISSING)
    ]
    if not diffs:  # only a flattening ambiguity (a key with a dot in it) could get here
        diffs = [f"{k}: differs" for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if len(diffs) > _MAX_LISTED:
        diffs = diffs[:_MAX_LISTED] + [f"and {len(diffs) - _MAX_LISTED} more"]
    raise CheckpointMismatchError(
        f"{path} was written by another config: {'; '.join(diffs)}; use a new --out or the same settings"
    )


def check_setup_part(path: str | os.PathLike, part: dict[str, Any]) -> None:
    """Refuse a resume onto ``path`` whose stored fingerprint has other values under ``part``'s keys.

    The loop checks the whole fingerprint when it loads; a setup calls this first, before its expensive stages
    (the small scale's teacher), so a resume with changed settings is refused before any work.
    """
    theirs = read_header(path).get("config", {})
    ours = json.loads(json.dumps(part))  # as JSON stores it: tuples become lists
    _check_fingerprint(Path(path), {k: theirs.get(k, _MISSING) for k in ours}, ours)


class Checkpointer(Protocol):
    """Where the loop keeps its training state; :func:`salt_ref.loop.train` calls these on every rank.

    ``state`` is the loop's training state, used by duck typing (this module does not import the loop):

    - ``state.task``: the task, with ``generator: nn.Module`` and ``critic: nn.Module | None``;
    - ``state.ema: nn.Module``, ``state.opt_gen: Optimizer``, ``state.opt_critic: Optimizer | None``
      (``None`` exactly when the task has no critic);
    - ``state.done: int``: generator iterations done (read on save, set on load);
    - ``state.rng_tensors() -> dict[str, Tensor]`` and ``state.set_rng(tensors)``: this rank's random
      generators as uint8 tensors, and their restore.

    ``fingerprint`` is the JSON-able description of what the run must keep equal on resume: ``save`` stores it,
    ``load`` refuses (:class:`CheckpointMismatchError`) a checkpoint that stored another one.
    """

    path: Path

    def exists(self) -> bool: ...

    def iteration(self) -> int: ...

    def save(self, state: Any, fingerprint: dict[str, Any]) -> None: ...

    def load(self, state: Any, fingerprint: dict[str, Any]) -> None: ...

    def discard(self) -> None:
        """Delete the checkpoint and any partial write of it (a fresh run starts over; never two runs' files)."""
        ...


class SafetensorsCheckpointer:
    """One safetensors file per run (single process), in the format above, replaced atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def iteration(self) -> int:
        return int(read_header(self.path)["iteration"])

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        _remove_leftovers(self.path)

    def save(self, state: Any, fingerprint: dict[str, Any]) -> None:
        task = state.task
        tensors = {**module_tensors("generator", task.generator), **module_tensors("ema", state.ema)}
        opt_t, opt_h = optimizer_tensors("opt_gen", state.opt_gen)
        tensors.update(opt_t)
        header: dict[str, Any] = {"iteration": state.done, "config": fingerprint, "opt_gen": opt_h}
        if state.opt_critic is not None:
            tensors.update(module_tensors("critic", task.critic))
            opt_t, header["opt_critic"] = optimizer_tensors("opt_critic", state.opt_critic)
            tensors.update(opt_t)
        tensors.update(state.rng_tensors())
        save_atomic(self.path, tensors, header)

    def load(self, state: Any, fingerprint: dict[str, Any]) -> None:
        _check_fingerprint(self.path, read_header(self.path).get("config", {}), fingerprint)
        tensors, header = load_state(self.path)
        task = state.task
        load_module_tensors("generator", task.generator, tensors)
        load_module_tensors("ema", state.ema, tensors)
        load_optimizer_tensors("opt_gen", state.opt_gen, tensors, header["opt_gen"])
        if state.opt_critic is not None:
            load_module_tensors("critic", task.critic, tensors)
            load_optimizer_tensors("opt_critic", state.opt_critic, tensors, header["opt_critic"])
        state.set_rng(tensors)
        state.done = int(header["iteration"])


class DCPCheckpointer:
    """A sharded ``torch.distributed.checkpoint`` folder for FSDP2 runs, written to ``<dir>.tmp`` then renamed.

    Holds ``generator``, ``ema``, ``critic`` and both optimizers (each rank writes its shards), one
    ``rng_rank<r>.pt`` per rank, and ``meta.json`` with the iteration, the run's fingerprint and its world size.

    **A DCP folder is trusted input.** ``torch.distributed.checkpoint`` unpickles the folder's ``.metadata`` on
    load, so a crafted folder runs code on ``--resume``: resume only folders your own runs wrote. To share
    weights, export them with ``python -m salt_ref.convert`` (one safetensors file, which loads no code). The
    per-rank RNG files are read with ``torch.load(weights_only=True)``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "meta.json").exists()

    def iteration(self) -> int:
        return int(json.loads((self.path / "meta.json").read_text())["iteration"])

    def discard(self) -> None:
        if rank_and_world()[0] == 0:
            for p in (
                self.path,
                self.path.with_name(self.path.name + ".tmp"),
                self.path.with_name(self.path.name + ".old"),
            ):
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    @staticmethod
    def _state_dicts(state: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        task = state.task
        g_sd, g_opt = get_state_dict(task.generator, state.opt_gen)
        out = {"generator": g_sd, "opt_gen": g_opt, "ema": get_model_state_dict(state.ema)}
        if state.opt_critic is not None:
            out["critic"], out["opt_critic"] = get_state_dict(task.critic, state.opt_critic)
        return out

    def save(self, state: Any, fingerprint: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        rank, world = rank_and_world()
        tmp, old = self.path.with_name(self.path.name + ".tmp"), self.path.with_name(self.path.name + ".old")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(self._state_dicts(state), checkpoint_id=str(tmp))
        torch.save(state.rng_tensors(), tmp / f"rng_rank{rank}.pt")
        barrier()
        if rank == 0:
            meta = {"iteration": state.done, "config": fingerprint, "world_size": world}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if self.path.exists():
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, state: Any, fingerprint: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        meta = json.loads((self.path / "meta.json").read_text())
        _check_fingerprint(self.path, meta["config"], fingerprint)
        rank, world = rank_and_world()
        if meta["world_size"] != world:
            raise CheckpointMismatchError(
                f"{self.path} was written by {meta['world_size']} ranks, this run has {world}: the per-rank "
                "random streams would not continue; resume with the same number of processes"
            )
        sds = self._state_dicts(state)
        dcp.load(sds, checkpoint_id=str(self.path))
        task = state.task
        set_state_dict(
            task.generator, state.opt_gen, model_state_dict=sds["generator"], optim_state_dict=sds["opt_gen"]
        )
        set_model_state_dict(state.ema, sds["ema"])
        if state.opt_critic is not None:
            set_state_dict(
                task.critic, state.opt_critic, model_state_dict=sds["critic"], optim_state_dict=sds["opt_critic"]
            )
        state.set_rng(torch.load(self.path / f"rng_rank{rank}.pt", weights_only=True))
        state.done = int(meta["iteration"])

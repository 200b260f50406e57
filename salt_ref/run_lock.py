r"""One output folder, one live run: the lock file ``<out>/.lock`` that :func:`salt_ref.loop.train` holds.

Two runs writing into the same folder would interleave their checkpoints and ``metrics.jsonl``; a resume started
while the first run is still alive would silently fork it. So ``train`` takes ``<out>/.lock`` (JSON
``{"pid", "host", "started"}``) before it writes anything and removes it when it returns or raises; a second run
on the folder raises :class:`RunLockedError`, naming the lock and the holder's pid.

A lock is *stale*, and is taken over, when its holder is gone: the file names this host and a pid that no longer
exists (``os.kill(pid, 0)`` raises ``ProcessLookupError``), or it is empty or unreadable (a run killed between
creating and writing it). A lock written on another host cannot be checked from here and counts as live.

Taking the lock is atomic: a fresh lock is created with ``O_CREAT | O_EXCL``, so of two runs starting together
exactly one gets it; a stale one is replaced (``os.replace`` of a complete temporary file) and read back, so a
takeover that lost a race sees the winner's lock and stops. On one host the attempts are also serialised by a
``flock`` on the folder, held for the few milliseconds an attempt takes, so no attempt reads a lock that another
is still writing. Under ``torch.distributed`` only rank 0 takes the lock; it then broadcasts the outcome, so the
other ranks raise too instead of waiting forever in their first collective, and start only once rank 0 holds it.

The lock is re-entrant within a thread of a process: the command line holds it over a whole run (clearing an old
run's files, training, writing the results) and :func:`salt_ref.loop.train` takes it again inside, in the same
thread; only the outermost release removes it. Two threads are two takers: one wins, the other is refused.

The holder is the training process itself, never a launcher: under ``torchrun`` the pid is rank 0's worker, so a
``torchrun`` killed alone (its workers live on in their own sessions) leaves a lock that still counts as live
while that worker writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from salt_ref.checkpoint import CheckpointMismatchError, rank_and_world

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".lock"

# locks this process holds, by (resolved path, thread), and how deeply each is nested
_HELD: dict[tuple[Path, int], int] = {}


class RunLockedError(CheckpointMismatchError):
    """Another live run holds the output folder (a :class:`~salt_ref.checkpoint.CheckpointMismatchError`, so
    the CLI reports it as one ``error:`` line)."""


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, ``None`` when it is empty or unreadable; ``FileNotFoundError`` when there is none."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or info["pid"] <= 0:
        return None
    return info


def _alive(info: dict[str, Any]) -> bool:
    """Whether the lock's holder may still be running (only a pid on this host can be checked)."""
    if info.get("host") != socket.gethostname() or os.name == "nt":  # on Windows os.kill would terminate it
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _locked_message(path: Path, info: dict[str, Any]) -> str:
    here = info.get("host") == socket.gethostname()
    unchecked = "" if here else " (it runs on another host, so it cannot be checked from here)"
    return (
        f"{path} is held by a live run: pid {info['pid']} on {info.get('host')}, started {info.get('started')}"
        f"{unchecked}; wait for it to end, use another --out, or delete the lock if that pid is not a training run"
    )


@contextlib.contextmanager
def _serialised(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` where the platform and file system allow; else nothing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: O_EXCL and the read-back still decide
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            pass
        yield  # closing the descriptor releases the flock
    finally:
        os.close(fd)


class RunLock:
    """The lock on ``out_dir`` (``out_dir/.lock``), held between :meth:`acquire` and :meth:`release`.

    Use it as a context manager. ``device`` is where rank 0 broadcasts the outcome under ``torch.distributed``
    (NCCL refuses CPU tensors: pass the device of the model's parameters); it is unused in a single process.
    """

    def __init__(self, out_dir: str | Path, *, device: torch.device | str = "cpu"):
        self.path = Path(out_dir) / LOCK_NAME
        self.device = torch.device(device)
        self._info: dict[str, Any] | None = None  # set while this process holds the lock
        self._key: tuple[Path, int] = (self.path.resolve(), 0)  # the thread is set when the lock is taken
        self._nested = False  # acquired inside another RunLock on the same folder in this process
        self._outer = False  # recorded in _HELD by this object (every rank, rank 0 also holds the file)

    def _take(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat()}
        text = json.dumps(info)
        with _serialised(self.path.parent):
            for _ in range(3):  # each round creates the lock, takes a stale one over, or meets a live holder
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pass
                else:
                    try:
                        with os.fdopen(fd, "w") as f:
                            f.write(text)
                    except BaseException:
                        self.path.unlink(missing_ok=True)
                        raise
                    self._info = info
                    return
                try:
                    held = _read(self.path)
                except FileNotFoundError:  # released meanwhile: create it
                    continue
                if held is not None and _alive(held):
                    raise RunLockedError(_locked_message(self.path, held))
                fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                    os.replace(tmp, self.path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                with contextlib.suppress(FileNotFoundError):
                    if _read(self.path) == info:  # read back: a concurrent takeover may have replaced ours
                        self._info = info
                        return
        raise RunLockedError(f"{self.path}: other runs keep taking this lock; use another --out")

    def acquire(self) -> None:
        """Take the lock (rank 0 only under ``torch.distributed``); :class:`RunLockedError` if a live run has it."""
        self._key = (self.path.resolve(), threading.get_ident())
        if self._key in _HELD:  # every rank records its holds, so every rank takes this branch together
            _HELD[self._key] += 1
            self._nested = True
            return
        rank, world = rank_and_world()
        if world == 1:
            self._take()
            _HELD[self._key], self._outer = 1, True
            return
        error: Exception | None = None
        if rank == 0:
            try:
                self._take()
            except Exception as e:  # every rank must hear of it, or the others wait forever
                error = e
        failed = torch.tensor([int(error is not None)], device=self.device)
        dist.broadcast(failed, src=0)
        if error is not None:
            raise error
        if failed.item():
            raise RunLockedError(f"{self.path}: rank 0 could not take the run lock; its error says why")
        _HELD[self._key], self._outer = 1, True

    def release(self) -> None:
        """Remove the lock if this process holds it (a lock someone else has since written is left alone)."""
        if self._nested:
            self._nested = False
            _HELD[self._key] -= 1
            return
        if self._outer:
            self._outer = False
            _HELD.pop(self._key, None)
        info, self._info = self._info, None
        if info is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if _read(self.path) == info:
                self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

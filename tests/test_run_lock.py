"""The run lock: one live run per output folder, stale locks taken over, the lock gone when the run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from salt_ref import checkpoint as ckpt
from salt_ref.loop import CHECKPOINT_NAME, METRICS_NAME, SCHEMA_NAME, LoopConfig, train
from salt_ref.run_lock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]


class _Tiny:
    def __init__(self):
        torch.manual_seed(0)
        self.generator = nn.Linear(2, 2)
        self.critic = None

    def generator_loss(self, it: int, rng, ema: nn.Module):
        return self.generator(torch.randn(4, 2, generator=rng.local)).pow(2).mean(), {"loss_gen": 0.0}

    def critic_loss(self, it, rng):  # pragma: no cover - no critic
        raise AssertionError


def _cfg(iters: int = 3) -> LoopConfig:
    return LoopConfig(iters=iters, lr_gen=1e-3, ema_start=0, ckpt_every=2, log_every=1)


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("resume", [False, True])
def test_live_holder_refuses_a_second_run(tmp_path, sleeper, resume):
    lock = _write_lock(tmp_path, sleeper.pid)
    before = lock.read_text()
    with pytest.raises(RunLockedError) as err:
        train(_Tiny(), _cfg(), tmp_path, progress=False, resume=resume)
    assert isinstance(err.value, ckpt.CheckpointMismatchError)  # the CLI prints it as one error: line
    assert str(err.value).startswith(f"{lock} is held by a live run: pid {sleeper.pid} on {socket.gethostname()}")
    assert lock.read_text() == before  # the holder keeps its lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # and nothing was written


def test_lock_from_another_host_counts_as_live(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="some-other-host")
    with pytest.raises(RunLockedError, match="on some-other-host.*another host, so it cannot be checked"):
        train(_Tiny(), _cfg(), tmp_path, progress=False)


@pytest.mark.parametrize("content", ["dead pid", "", "{not json", '{"pid": "x"}'])
def test_stale_lock_is_taken_over_and_the_run_completes(tmp_path, content):
    if content == "dead pid":
        _write_lock(tmp_path, _dead_pid())
    else:
        (tmp_path / LOCK_NAME).write_text(content)
    seen: list[dict] = []
    result = train(
        _Tiny(),
        _cfg(),
        tmp_path,
        progress=False,
        callback=lambda i, _: seen.append(json.loads((tmp_path / LOCK_NAME).read_text())),
    )
    assert result.iterations == 3
    assert {s["pid"] for s in seen} == {os.getpid()}  # held by this run throughout
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, METRICS_NAME, SCHEMA_NAME]


def test_lock_is_gone_after_a_run_and_is_not_in_its_outputs(tmp_path):
    train(_Tiny(), _cfg(), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, METRICS_NAME, SCHEMA_NAME]
    rows = [json.loads(x) for x in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3]
    assert "lock" not in json.dumps(ckpt.read_header(tmp_path / CHECKPOINT_NAME))
    # a resume takes it again and gives it back
    assert train(_Tiny(), _cfg(5), tmp_path, progress=False, resume=True).iterations == 5
    assert not (tmp_path / LOCK_NAME).exists()


class _Boom(Exception):
    pass


def test_lock_is_gone_after_a_run_that_raised(tmp_path):
    def boom(done: int, logs: dict) -> None:
        assert (tmp_path / LOCK_NAME).exists()
        raise _Boom

    with pytest.raises(_Boom):
        train(_Tiny(), _cfg(), tmp_path, progress=False, callback=boom)
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(FileNotFoundError):  # a failed resume releases it too
        train(_Tiny(), _cfg(), tmp_path / "empty", progress=False, resume=True)
    assert not (tmp_path / "empty" / LOCK_NAME).exists()


def test_lock_is_reentrant_in_a_process_and_only_the_outermost_release_removes_it(tmp_path):
    with RunLock(tmp_path):  # the command line holds it over the whole run; train takes it again inside
        train(_Tiny(), _cfg(), tmp_path, progress=False)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_held_by_another_process_then_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from salt_ref.run_lock import RunLock\n"
            f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            train(_Tiny(), _cfg(), tmp_path, progress=False)
        holder.stdin.close()  # the holder leaves its with-block and removes the lock
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / LOCK_NAME).exists()
    assert train(_Tiny(), _cfg(), tmp_path, progress=False).iterations == 3


def test_concurrent_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    _write_lock(tmp_path, _dead_pid())
    start = threading.Barrier(8)
    won, refused = [], []

    def take() -> None:
        lock = RunLock(tmp_path)
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except RunLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left behind


_DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from salt_ref.run_lock import RunLock, RunLockedError

    rank, out, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    lock = RunLock(out)
    try:
        lock.acquire()
        first = "acquired"
    except RunLockedError as e:
        first = str(e)
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(out, ".lock"))  # the holder is gone: now both ranks must get through
    dist.barrier()
    lock.acquire()
    held = os.path.exists(os.path.join(out, ".lock")) if rank == 0 else None
    dist.barrier()
    lock.release()
    dist.barrier()
    print(json.dumps({"first": first, "held": held}))
    dist.destroy_process_group()
    """
)


def test_under_torch_distributed_every_rank_hears_rank_0s_outcome(tmp_path, sleeper, launch_ranks):
    out = tmp_path / "out"
    _write_lock(out, sleeper.pid)
    r0, r1 = launch_ranks(_DIST_SCRIPT, str(out), str(tmp_path / "store"))
    assert r0["first"].startswith(f"{out / LOCK_NAME} is held by a live run: pid {sleeper.pid} ")
    assert r1["first"] == f"{out / LOCK_NAME}: rank 0 could not take the run lock; its error says why"
    assert r0["held"] is True
    assert not (out / LOCK_NAME).exists()

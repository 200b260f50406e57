"""The training loop: bitwise resume, NaN stop with the last good checkpoint kept, config checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from salt_ref import checkpoint as ckpt
from salt_ref.loop import CHECKPOINT_NAME, LoopConfig, NonFiniteLossError, train
from toy.setup_2d import Toy2DConfig, build_task

TINY = dict(batch=32, hidden=16, depth=2, pretrain_iters=20)


def _cfg(method: str = "sc-dmd") -> Toy2DConfig:
    return Toy2DConfig(method=method, **TINY)


def _loop(iters: int = 12) -> LoopConfig:
    return LoopConfig(
        iters=iters, critic_ratio=2, lr_gen=1e-3, lr_critic=1e-3, ema_start=3, ckpt_every=4, log_every=1, seed=3
    )


def _weights(path) -> dict[str, Tensor]:
    return ckpt.load_state(path)[0]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["sc-dmd", "cd"])
def test_resume_reaches_bitwise_same_weights(tmp_path, method):
    torch.manual_seed(0)
    full = train(build_task(_cfg(method)), _loop(), tmp_path / "full", progress=False)

    def kill_at_7(done: int, logs: dict) -> None:
        if done == 7:  # after the checkpoint at 4, before the one at 8
            raise _Killed

    with pytest.raises(_Killed):
        train(build_task(_cfg(method)), _loop(), tmp_path / "killed", progress=False, callback=kill_at_7)
    assert ckpt.read_header(tmp_path / "killed" / CHECKPOINT_NAME)["iteration"] == 4
    resumed = train(build_task(_cfg(method)), _loop(), tmp_path / "killed", progress=False, resume=True)
    assert resumed.iterations == full.iterations == 12
    a, b = _weights(tmp_path / "full" / CHECKPOINT_NAME), _weights(tmp_path / "killed" / CHECKPOINT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == list(range(1, 13))


def test_resume_with_other_config_is_refused(tmp_path):
    train(build_task(_cfg()), _loop(4), tmp_path, progress=False)
    other = LoopConfig(**{**_loop(4).__dict__, "lr_gen": 5e-4})
    with pytest.raises(ckpt.CheckpointMismatchError, match="lr_gen"):
        train(build_task(_cfg()), other, tmp_path, progress=False, resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(build_task(_cfg()), _loop(2), tmp_path, progress=False, resume=True)


class _NaNAfter:
    """A task whose generator loss turns NaN at a chosen iteration."""

    def __init__(self, at: int):
        self.generator = nn.Linear(2, 2)
        self.critic = None
        self.at = at

    def generator_loss(self, it: int, rng, ema: nn.Module):
        loss = self.generator(torch.randn(4, 2, generator=rng.local)).pow(2).mean()
        return (loss * float("nan") if it >= self.at else loss), {}

    def critic_loss(self, it, rng):  # pragma: no cover - no critic
        raise AssertionError


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = LoopConfig(iters=10, ckpt_every=3, lr_gen=1e-2, ema_start=0, seed=0)
    with pytest.raises(NonFiniteLossError, match=r"iteration 7.*iteration 6"):
        train(_NaNAfter(7), cfg, tmp_path, progress=False)
    tensors, header = ckpt.load_state(tmp_path / CHECKPOINT_NAME)
    assert header["iteration"] == 6
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())


def test_load_module_names_missing_unexpected_and_shapes():
    src = {"m.weight": torch.zeros(3, 2), "m.extra": torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.load_module_tensors("m", nn.Linear(2, 2), src)
    msg = str(err.value)
    assert "bias" in msg and "extra" in msg and "weight: checkpoint (3, 2) vs model (2, 2)" in msg


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="iters"):
        LoopConfig(iters=-1)
    with pytest.raises(ValueError, match="ema_decay"):
        LoopConfig(ema_decay=1.0)


def test_mlp_teacher_option_trains_through_the_loop(tmp_path):
    cfg = Toy2DConfig(method="dmd", teacher="mlp", teacher_iters=5, **TINY)
    result = train(build_task(cfg), _loop(2), tmp_path, progress=False)
    assert result.iterations == 2 and torch.isfinite(torch.tensor(result.last_logs["loss_dmd"]))

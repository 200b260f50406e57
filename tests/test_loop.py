"""The training loop: bitwise resume, the EMA rule, NaN stop with the last good checkpoint kept, the resume
fingerprint (one rule at every scale, refusals that name the fields), config checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from salt_ref import checkpoint as ckpt
from salt_ref.loop import CHECKPOINT_NAME, LoopConfig, NonFiniteLossError, loop_fingerprint, train
from toy.setup_2d import Toy2DConfig, build_task

TINY = dict(batch=32, hidden=16, depth=2, pretrain_iters=20, ode_iters=20, ode_pairs=256)


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


class _OneParam:
    """A generator with one scalar weight pulled towards noisy targets, so that it moves every iteration."""

    def __init__(self):
        self.generator = nn.Module()
        self.generator.w = nn.Parameter(torch.tensor(0.0))
        self.critic = None

    def generator_loss(self, it: int, rng, ema: nn.Module):
        target = 1.0 + torch.randn((), generator=rng.local)
        return (self.generator.w - target).pow(2), {"loss_gen": 0.0}

    def critic_loss(self, it, rng):  # pragma: no cover - no critic
        raise AssertionError


def test_ema_copies_before_ema_start_then_blends_with_one_minus_decay(tmp_path):
    cfg = LoopConfig(iters=8, lr_gen=0.2, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.7, ema_start=3)
    task = _OneParam()
    after: list[float] = []
    result = train(task, cfg, tmp_path, progress=False, callback=lambda i, _: after.append(task.generator.w.item()))
    assert len(set(after)) == len(after) == 8  # the weight moves, so the two rules would disagree
    ema = 0.0
    for it, p in enumerate(after):
        ema = p if it < cfg.ema_start else cfg.ema_decay * ema + (1 - cfg.ema_decay) * p
    assert result.ema.w.item() == pytest.approx(ema, abs=1e-6)


def _tiny_loop(**kw) -> LoopConfig:
    return LoopConfig(**{"iters": 4, "lr_gen": 1e-3, "ema_start": 0, "ckpt_every": 2, "log_every": 1, **kw})


def test_resume_may_change_bookkeeping(tmp_path):
    train(_OneParam(), _tiny_loop(), tmp_path, fingerprint={"setup": {"n": 1}}, progress=False)
    result = train(
        _OneParam(),
        _tiny_loop(iters=6, ckpt_every=3, log_every=2),
        tmp_path,
        fingerprint={"setup": {"n": 1}},
        progress=False,
        resume=True,
    )
    assert result.iterations == 6
    header = ckpt.read_header(tmp_path / CHECKPOINT_NAME)
    assert header["config"] == {
        "setup": {"n": 1},
        "loop": json.loads(json.dumps(loop_fingerprint(_tiny_loop()))),
        "world_x_accum": 1,
    }


def test_refused_resume_names_each_differing_field_with_both_values(tmp_path):
    train(_OneParam(), _tiny_loop(), tmp_path, fingerprint={"toy": {"method": "sc-dmd"}}, progress=False)
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        train(
            _OneParam(),
            _tiny_loop(lr_gen=5e-4),
            tmp_path,
            fingerprint={"toy": {"method": "dmd"}},
            progress=False,
            resume=True,
        )
    assert str(err.value) == (
        f"{tmp_path / CHECKPOINT_NAME} was written by another config: toy.method: checkpoint 'sc-dmd', now 'dmd'; "
        "loop.lr_gen: checkpoint 0.001, now 0.0005; use a new --out or the same settings"
    )


def test_refusal_lists_eight_fields_then_counts_the_rest(tmp_path):
    theirs = {"a": {f"f{i}": i for i in range(11)}, "gone": 1}
    ours = {"a": {f"f{i}": -i - 1 for i in range(11)}, "new": [1, 2]}
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt._check_fingerprint(tmp_path / "c", theirs, ours)
    msg = str(err.value)
    assert "a.f0: checkpoint 0, now -1; " in msg and "a.f7: checkpoint 7, now -8; and 5 more; use a new" in msg
    assert "a.f8" not in msg
    with pytest.raises(
        ckpt.CheckpointMismatchError, match=r"new: checkpoint absent, now \[1, 2\]; gone: checkpoint 1, now absent;"
    ):
        ckpt._check_fingerprint(tmp_path / "c", {"gone": 1}, {"new": [1, 2]})


@pytest.mark.parametrize("key", ["loop", "world_x_accum"])
def test_fingerprint_must_not_bring_its_own_loop_rule(tmp_path, key):
    with pytest.raises(ValueError, match=f"must not contain \\['{key}'\\]"):
        train(_OneParam(), _tiny_loop(), tmp_path / "out", fingerprint={"setup": {}, key: {}}, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written


_NAN_ON_ONE_RANK = """
import json, sys
import torch, torch.distributed as dist
from salt_ref.loop import LoopConfig, NonFiniteLossError, train

rank, out, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)


class Task:
    critic = None

    def __init__(self):
        self.generator = torch.nn.Linear(2, 1)

    def generator_loss(self, it, rng, ema):
        loss = self.generator(torch.ones(1, 2)).pow(2).mean()
        if rank == 1 and it == 1:  # only this rank breaks, at the second iteration
            loss = loss * float("nan")
        return loss, {"loss": loss.item()}


try:
    train(Task(), LoopConfig(iters=3, critic_ratio=0, ckpt_every=10), out + f"/r{rank}", progress=False)
    result = "finished"
except NonFiniteLossError as e:
    result = str(e)
print(json.dumps({"rank": rank, "result": result}))
dist.destroy_process_group()
"""


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path, launch_ranks):
    r0, r1 = (r["result"] for r in launch_ranks(_NAN_ON_ONE_RANK, str(tmp_path), str(tmp_path / "store")))
    assert r1.startswith("gen loss is nan at iteration 1")
    assert r0.startswith("gen loss is not finite on another rank at iteration 1")

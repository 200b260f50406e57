"""Run under ``torchrun --nproc_per_node 2``: the tiny full-scale task's generator gradients with activation
checkpointing on and off, under each memory policy given, written as JSON by rank 0 (``tests/test_full.py``).

Usage: ``torchrun ... tests/full_grad_worker.py OUT.json POLICY [POLICY ...] -- <salt_ref.train --scale full flags>``
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist

from salt_ref.full import start
from salt_ref.kv_cache import MemoryPolicy
from salt_ref.loop import Rng
from salt_ref.train import build_parser

# (step list, exit): the SC term through the cache at a middle step, and Salt's alignment with its reference path
DRAWS = ((8, 3), (2, 1))


def grads_of(task, ckpt: bool, draw: tuple[int, int]) -> tuple[list[torch.Tensor], dict]:
    """Generator gradients (this rank's shards) of one fixed micro-batch and draw, checkpointing ``ckpt``."""
    for model in (task.generator, task.critic, task.teacher):
        model.gradient_checkpointing = ckpt
    task.generator.zero_grad(set_to_none=True)
    rng = Rng(torch.Generator().manual_seed(3), torch.Generator().manual_seed(4 + dist.get_rank()))
    with task.amp():
        objective = task.objective(rng)
        loss, logs = objective.loss(objective.plan(*draw, it=10**6, shared=rng.shared), rng.local)
    loss.backward()
    return [p.grad.to_local().detach().clone() for p in task.generator.parameters()], logs


def main() -> None:
    split = sys.argv.index("--")
    out, policies, flags = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    args = build_parser("full").parse_args(flags)
    run = start(args)
    result = {}
    for spec, draw in ((spec, draw) for spec in policies for draw in DRAWS):
        run.task.cfg.memory = MemoryPolicy.parse(spec)
        on, logs_on = grads_of(run.task, True, draw)
        off, logs_off = grads_of(run.task, False, draw)
        pairs = [(a, b) for a, b in zip(on, off, strict=True) if b.numel()]  # a rank's shard may be empty
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        scale = max(float(b.float().abs().max()) for _, b in pairs)
        diff_t = torch.tensor([diff], dtype=torch.float64)
        dist.all_reduce(diff_t, op=dist.ReduceOp.MAX)  # gloo: CPU tensors are the model's device here
        result[f"{spec} {draw[0]}-step exit {draw[1]}"] = {
            "max_abs_diff": float(diff_t),
            "max_abs_grad": scale,
            "logs_on": logs_on,
            "logs_off": logs_off,
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    # Tear down while the interpreter is whole: once in CI (and 2 of 12 local runs under load) a rank aborted
    # *after* writing the JSON with "terminate called without an active exception", gloo's worker threads still
    # holding tensors of the FSDP models at interpreter finalisation. So: wait for both ranks, drop the models
    # and collect them, then destroy the group.
    dist.barrier()
    del run
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

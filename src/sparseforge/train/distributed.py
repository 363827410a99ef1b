"""Data-parallel sparse training with ``torch.distributed`` (DDP; gloo on CPU, NCCL on GPUs).

Under DDP every rank holds the same weights, but each sees its own mini-batch, so anything a
mask update reads from the *local* backward pass differs between ranks: RigL's dense gradient
(stored by the trainer's hook before DDP's all-reduce, which only ever sees the masked gradient),
sparse momentum's dense-gradient momentum. :func:`distribute` gives the trainer a reducer that
averages those over the ranks right before every mask update, so all ranks compute the same
masks (the magnitude drop reads identical weights; SET's random regrowth uses the same seeded
generator everywhere). Growth therefore ranks the gradient of the *global* batch, as in the
reference implementations (google-research/rigl reads the cross-replica mean gradient;
condensed-sparsity all-reduces its grow scores).

Usage (one process per rank, after ``init_process_group``)::

    net = build_model()                      # same seed on every rank
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    trainer = distribute(RigL(net, opt, sparsity=0.9, schedule={"end_step": 750}))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    for x, y in local_batches:
        loss_fn(ddp(x), y).backward()
        opt.step(); opt.zero_grad()
        trainer.step()
    assert masks_in_sync(trainer)

Checkpoints are per rank and identical: save ``net``, ``opt`` and ``trainer`` state dicts on
rank 0 and load them on every rank for a bit-exact resume (tested with 2 gloo processes).
"""

from __future__ import annotations

import torch

from sparseforge.errors import ConfigError
from sparseforge.train.base import SparseTrainer

__all__ = ["distribute", "masks_in_sync"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialised; call torch.distributed.init_process_group first")
    return dist


def distribute(trainer: SparseTrainer, group=None) -> SparseTrainer:
    """Make ``trainer`` average its update inputs over the ranks of ``group`` (default: all). Returns it."""
    dist = _dist()
    world = dist.get_world_size(group)

    def reducer(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world)

    trainer.reducer = reducer
    if not masks_in_sync(trainer, group):
        raise ConfigError(
            "the sparse trainer's masks differ between ranks at attach time: build the model and the trainer "
            "with the same seed on every rank (config 'seed')"
        )
    return trainer


def masks_in_sync(trainer: SparseTrainer, group=None) -> bool:
    """Whether every rank of ``group`` holds exactly the same masks (a collective: call it on all ranks)."""
    dist = _dist()
    same = True
    for layer in trainer.layers:
        local = layer.mask.to(torch.float32)  # (out, in)
        hi, lo = local.clone(), local.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        same &= bool(torch.equal(hi, lo))
    return same

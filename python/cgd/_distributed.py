"""What the optimizers need from torch.distributed for DTensor (FSDP2) parameters: the local shard to hand to
the kernels, and a sum over the ranks that hold the other shards.

Elementwise updates need no communication: each rank steps its shard, with state created like the parameter
(a DTensor of the same placements, so torch.distributed.checkpoint can reshard it). Only quantities summed over
all elements (the induced metric's norm, the non-finite flag) are all-reduced, over the mesh dimensions the
tensors are sharded on; replicated dimensions already hold the whole sum.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch without DTensor: nothing is ever distributed here
    DTensor = Replicate = Shard = None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update in place: a DTensor's local shard (a view), else the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def _shard_groups(tensors: Iterable[torch.Tensor]) -> list:
    """The process groups of the mesh dimensions on which one of `tensors` is sharded (one mesh expected)."""
    groups = {}
    for t in tensors:
        if is_dtensor(t):
            mesh = t.device_mesh
            for dim, placement in enumerate(t.placements):
                if isinstance(placement, Shard):
                    groups[(id(mesh), dim)] = mesh.get_group(dim)
    return list(groups.values())


def sum_over_shards(value: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """All-reduces `value` (a local partial sum over the local shards of `tensors`) over every mesh dimension
    on which one of them is sharded."""
    for group in _shard_groups(tensors):
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def mean_over_shards(value: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of `value` over the ranks that hold the other shards of `tensors` (e.g. each rank's own loss)."""
    groups = _shard_groups(tensors)
    ranks = 1
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        ranks *= dist.get_world_size(group)
    return value / ranks


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor), else the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def step_shard(p: torch.Tensor, whole_step: torch.Tensor, decay: float, skip: torch.Tensor | None) -> None:
    """p's local shard <- shard * decay + its part of `whole_step`, the step every rank computed alike from
    gathered gradients; left alone, without a host synchronisation, where `skip` is nonzero."""
    shard = local(p)
    stepped = shard * decay + shard_like(whole_step, p)
    if skip is not None:
        stepped = torch.where(skip.to(shard.device) != 0, shard, stepped)
    shard.copy_(stepped)


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole` (identical on every rank) in `like`'s placements: a local slice, no
    communication."""
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()

"""OsciReset on sharded weights: ``Q`` from the whole weight, window state and resets on the local rows.

FSDP2 (``fully_shard``) holds each parameter as a DTensor sharded along dim 0 (``Shard(0)`` on a 1-D
mesh, ``torch.chunk`` sizes). The forward quantizes the whole, all-gathered weight, so ``Q`` must too:
its per-tensor scale comes from the whole weight's amax. OsciReset therefore all-gathers a tracked
weight for each quantization (only on its snapshot, tracked and reset steps) and keeps its window state
(previous weight, distances, sampled indices) for the local rows only; every rank decides the resets of
its own rows, which is what one process deciding for the whole weight does. Plain tensors (one
process, DDP replicas) pass through unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["check_shardable", "full_from_local", "full_weight", "is_sharded", "local_part", "local_rows",
           "local_weight"]  # fmt: skip


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor (e.g. an FSDP2 parameter)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def check_shardable(param: torch.Tensor, fqn: str) -> None:
    """Raise ``NotImplementedError`` for DTensor layouts other than rows sharded on a 1-D mesh (FSDP2's)."""
    if not is_sharded(param):
        return
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            f"OsciReset supports DTensor weights sharded by rows on a 1-D mesh (FSDP2's Shard(0)); {fqn!r} has "
            f"placements {placements} on a {param.device_mesh.ndim}-D mesh"
        )


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """``(first row, row count)`` of this rank's part of ``param`` (all rows for a plain tensor)."""
    rows = param.shape[0]
    if not is_sharded(param):
        return 0, rows
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world)  # torch.chunk's sizes: ceil(rows / world), the last ones shorter or empty
    first = min(rank * chunk, rows)
    count = max(0, min(chunk, rows - first))
    local = param.to_local().shape[0]
    if local != count:
        raise NotImplementedError(f"unexpected shard of {tuple(param.shape)}: {local} local rows, expected {count}")
    return first, count


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """The whole weight, detached (an all-gather for a DTensor: every rank must call it, in the same order)."""
    return param.detach().full_tensor() if is_sharded(param) else param.detach()


def local_weight(param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``param``, detached, sharing its storage (writes update the parameter)."""
    return param.detach().to_local() if is_sharded(param) else param.detach()


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (shaped like ``param``) that this rank holds."""
    if not is_sharded(param):
        return full
    first, count = local_rows(param)
    return full[first : first + count]


def full_from_local(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's ``local`` rows (an all-gather), laid out like ``param``."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    dt = DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return dt.full_tensor()

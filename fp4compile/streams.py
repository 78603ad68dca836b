"""The random streams of the quantized linear layer: fresh every call, reproducible, different on every rank.

Stochastic rounding seeds and random Hadamard signs are drawn from torch's default generator of the
tensor's device, so ``torch.manual_seed`` makes a run reproducible and CUDA graphs replay fresh draws.
Under ``torch.distributed`` every rank usually seeds that generator alike; drawn as they are, the
ranks would then round their shards with the same bits, and the noise that data parallelism should
average out would repeat. So each rank takes its own stream from the same draw: the Philox seed is
offset by the rank (a different Philox key, an independent stream), and the signs are the rank's
slice of ``world_size`` times as many drawn signs (every rank consumes the generator alike). Rank 0 of
any world draws exactly what a single process draws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .quantize import draw_seed, draw_signs

__all__ = ["rank_and_world", "stream_seed", "stream_signs"]

_SEED_RANGE = 2**62  # draw_seed's range
_RANK_STRIDE = 0x2545F4914F6CDD1D  # odd, far from small multiples: ranks land on unrelated Philox keys


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def stream_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed (int64 [1] on ``device``) for this call, from this rank's stream (no host sync)."""
    seed = draw_seed(device)
    rank, _ = rank_and_world()
    if rank == 0:
        return seed
    return torch.remainder(seed + (rank * _RANK_STRIDE) % _SEED_RANGE, _SEED_RANGE)


def stream_signs(n: int, device: torch.device) -> torch.Tensor:
    """``n`` random +-1 signs (float32 on ``device``) for this call, from this rank's stream."""
    rank, world = rank_and_world()
    if world == 1:
        return draw_signs(n, device)
    return draw_signs(n * world, device)[n * rank : n * (rank + 1)].contiguous()

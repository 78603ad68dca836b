"""``fp4compile train --nproc N``: each recipe trained by N data-parallel processes (DDP, compiled after wrapping).

Gloo on the CPU, NCCL on GPUs (one GPU per rank). Every rank reads its own micro-batches (``train_batch`` at
index ``step * N + rank``), so one step sees ``N x batch`` sequences; rank 0 reports the run: losses averaged
over the ranks, tokens/s of all of them. The processes are started with ``torch.multiprocessing`` on this
machine (what ``torchrun --standalone`` would start), one set per recipe.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from .corpus import Corpus
from .train import RecipeRun, TrainConfig, train_recipe

__all__ = ["train_on_ranks"]


def train_on_ranks(recipe: str, config: TrainConfig, corpus: Corpus, progress: bool) -> RecipeRun:
    """:func:`~fp4compile.demo.train.train_recipe` on ``config.nproc`` spawned processes under DDP; rank 0's run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.pt")
        args = (config.nproc, os.path.join(tmp, "init"), recipe, config, corpus, progress, out)
        mp.start_processes(_rank_main, args=args, nprocs=config.nproc, join=True, start_method="spawn")
        return torch.load(out, weights_only=False)


def _rank_main(rank, world, init_file, recipe, config, corpus, progress, out) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # the ranks share the CPU cores
    backend = "nccl" if config.device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run = train_recipe(recipe, config, corpus, progress=progress, log=print if rank == 0 else lambda _: None)
        if rank == 0:
            torch.save(run, out)
    finally:
        torch.distributed.destroy_process_group()

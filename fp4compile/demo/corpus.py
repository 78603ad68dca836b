"""The training corpus of ``fp4compile train``: the user's text (``--data``) or, by default, the running
interpreter's own standard-library sources, as bytes.

``--data PATH...`` reads text files, and every text file below each directory (sorted; hidden ones,
``__pycache__`` and binary files skipped, the binary ones counted in :meth:`Corpus.describe`), as bytes; a
file named explicitly with a NUL byte is refused as binary, and all-empty input is refused too. By default nothing is
downloaded. The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
and ``__pycache__`` excluded) are listed in sorted order of their relative paths; a subset of about
the requested size is taken at an even stride over that list (so it spans the whole library, not
just the first letters of the alphabet), and every ``val_every``-th file of the subset goes to the
validation split, the rest to the training split. Splitting by file keeps the two disjoint: no
validation window overlaps text the model trained on. Batches are drawn from a generator seeded by
(seed, step), so every run with the same seed sees the same data in the same order.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Corpus", "load_corpus", "stdlib_sources", "text_sources", "train_batch", "val_batches"]

_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_sources(root: Optional[str] = None) -> list[tuple[str, int]]:
    """``(relative path, size in bytes)`` of every standard-library ``.py`` file, sorted by path.

    Args:
        root: the directory to list (default: this interpreter's ``sysconfig.get_paths()["stdlib"]``).
    """
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    found.append((os.path.relpath(path, root).replace(os.sep, "/"), os.path.getsize(path)))
    if not found:
        raise RuntimeError(f"no .py files found under the standard library directory {root!r}")
    return sorted(found)


@dataclass(frozen=True)
class Corpus:
    """Byte tensors of the two splits and the files each came from.

    Attributes:
        train: uint8 [n_train] (files joined in order, separated by a newline).
        val: uint8 [n_val].
        train_files / val_files: relative paths under ``root``, in the order they were joined.
        root: the standard-library directory they were read from ("" for ``--data``: the paths are the files).
        source: what the files are, for :meth:`describe` (``stdlib .py files from ROOT``, ``--data files``).
    """

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str
    source: str = ""
    unit: str = "byte"  # what an element of train / val is: a byte, or a token (--tokenizer)

    def describe(self) -> str:
        """One line: sizes and file counts of the two splits."""
        source = self.source or f"stdlib .py files from {self.root}"
        size = "MB" if self.unit == "byte" else "M tokens"
        return (
            f"corpus: {len(self.train_files) + len(self.val_files)} {source}: "
            f"train {len(self.train) / 1e6:.2f} {size} ({len(self.train_files)} files), "
            f"val {len(self.val) / 1e6:.2f} {size} ({len(self.val_files)} files)"
        )


def _looks_binary(file: str) -> bool:
    with open(file, "rb") as f:
        return b"\0" in f.read(65536)


def text_sources(paths: Sequence[str], skipped: Optional[list[str]] = None) -> list[tuple[str, int]]:
    """``(path, size in bytes)`` of the files ``paths`` name: files as given, directories walked (sorted; hidden
    files and directories and ``__pycache__`` skipped, and binary files, listed in ``skipped``), in the order
    given. Raises ``ValueError`` naming a path that does not exist, a file named explicitly that looks binary (a
    NUL byte in its first 64 KiB), or input without a single byte."""
    found: list[tuple[str, int]] = []
    for path in paths:
        if os.path.isfile(path):
            if _looks_binary(path):
                raise ValueError(f"--data: {path!r} looks binary (it holds NUL bytes); pass text files")
            found.append((path, os.path.getsize(path)))
        elif os.path.isdir(path):
            for directory, subdirs, files in os.walk(path):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in _EXCLUDED_DIRS)
                for name in sorted(f for f in files if not f.startswith(".")):
                    file = os.path.join(directory, name)
                    if _looks_binary(file):
                        if skipped is not None:
                            skipped.append(file)
                        continue
                    found.append((file, os.path.getsize(file)))
        else:
            raise ValueError(f"--data {path!r}: no such file or directory")
    if not any(size for _, size in found):
        raise ValueError(f"--data {' '.join(paths)!r}: no text to train on (no file, or only empty files)")
    return found


def load_corpus(
    target_bytes: int, val_every: int = 10, root: Optional[str] = None, data: Optional[Sequence[str]] = None
) -> Corpus:
    """Read a deterministic subset of about ``target_bytes`` of text and split it by file.

    Args:
        target_bytes: how many bytes to read in all (everything if there is less).
        val_every: every ``val_every``-th file of the subset (the last of each group) is validation.
        root: the directory to read (default: this interpreter's standard library).
        data: the user's text files and directories (``--data``) instead of the standard library.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, got {val_every}")
    if data:
        skipped: list[str] = []
        files = text_sources(data, skipped)
        root, source = "", "--data files" + (f" ({len(skipped)} binary files skipped)" if skipped else "")
    else:
        root, source = root or sysconfig.get_paths()["stdlib"], ""
        files = stdlib_sources(root)
    total = sum(size for _, size in files)
    stride = max(1, total // target_bytes)
    subset, size = [], 0
    for offset in range(stride):  # one pass per phase of the stride, until the target is reached
        for path, nbytes in files[offset::stride]:
            if size >= target_bytes:
                break
            subset.append(path)
            size += nbytes
    position = {path: i for i, (path, _) in enumerate(files)}
    subset.sort(key=position.__getitem__)  # the files' own order (sorted paths for the standard library)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i, path in enumerate(subset):
        splits["val" if i % val_every == val_every - 1 else "train"].append(path)
    if not splits["val"]:  # a tiny subset: give validation its last file
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        if data:
            raise ValueError("--data: train and validation are split by file; give at least two files")
        raise ValueError(f"target_bytes={target_bytes} selects too few files to split; ask for more")

    def read(paths: list[str]) -> torch.Tensor:
        chunks = []
        for path in paths:
            with open(os.path.join(root, path), "rb") as f:
                chunks.append(f.read())
        return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()

    return Corpus(read(splits["train"]), read(splits["val"]), tuple(splits["train"]), tuple(splits["val"]), root,
                  source)  # fmt: skip


def _windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def train_batch(data: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, both int64 [batch, seq], of training ``step``: random windows of ``data``.

    The windows depend only on (``seed``, ``step``), so every recipe trains on the same data in the same order.
    """
    if len(data) < seq + 2:
        raise ValueError(f"the training split ({len(data)} bytes) is shorter than one sequence ({seq + 1} bytes)")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    return _windows(data, starts, seq)


def val_batches(data: torch.Tensor, n_batches: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: ``n_batches`` batches of windows spaced evenly over ``data`` (no randomness)."""
    count = n_batches * batch
    span = len(data) - seq - 1
    if span < 1:
        raise ValueError(f"the validation split ({len(data)} bytes) is shorter than one sequence ({seq + 1} bytes)")
    starts = torch.linspace(0, span - 1, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    return [_windows(data, starts[i * batch : (i + 1) * batch], seq) for i in range(n_batches)]

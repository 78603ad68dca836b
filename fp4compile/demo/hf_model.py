"""``fp4compile train --hf-config PATH``: a Hugging Face causal-LM architecture, randomly initialized, on bytes.

The ``config.json`` of a causal language model (Llama, Qwen2, GPT-2, Mistral, ...) gives the architecture;
its vocabulary becomes the 256 byte values (the demo's data is bytes) and nothing is downloaded: the config
is read from the file, the weights are fresh (from ``--seed``, the same for every recipe).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HFByteLM", "load_hf_config", "load_tokenizer", "tokenize_corpus"]

BYTE_VOCAB = 256


def load_tokenizer(path: str):
    """The tokenizer saved in directory ``path`` (``save_pretrained``'s files; nothing is downloaded)."""
    import transformers

    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path!r}: not a directory (give the directory a tokenizer was saved to)")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {path!r}: no tokenizer could be loaded from it ({error})") from None


def tokenize_corpus(corpus, tokenizer):
    """``corpus`` with both splits as token ids (int64) of ``tokenizer`` instead of bytes (text decoded as UTF-8,
    undecodable bytes replaced)."""
    import dataclasses

    def ids(data: torch.Tensor) -> torch.Tensor:
        text = bytes(data.tolist()).decode("utf-8", errors="replace")
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    return dataclasses.replace(corpus, train=ids(corpus.train), val=ids(corpus.val), unit="token")


def load_hf_config(path: str, seq: int, vocab_size: int = BYTE_VOCAB):
    """The ``transformers`` config of the causal LM in ``path`` (a ``config.json`` or a directory holding one), its
    vocabulary set to ``vocab_size`` (the bytes, or a tokenizer's). Raises ``ValueError`` naming the problem
    (missing file, not JSON, no ``model_type``, not a causal LM, positions fewer than ``seq``)."""
    import transformers

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"--hf-config {path!r}: no such file (give a config.json or the directory holding it)"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--hf-config {file!r}: cannot read it as JSON ({error})") from None
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if model_type is None:
        raise ValueError(f'--hf-config {file!r}: no "model_type" (a Hugging Face config.json names its model type)')
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"--hf-config {file!r}: transformers does not know model_type {model_type!r} ({error})"
        ) from None
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"--hf-config {file!r}: {model_type!r} is not a causal language model")
    config.vocab_size = vocab_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # token ids of another vocabulary
        if getattr(config, name, None) is not None:
            setattr(config, name, None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and positions < seq:
        raise ValueError(f"--hf-config {file!r}: {positions} positions, fewer than --seq {seq}")
    return config


class HFByteLM(nn.Module):
    """A ``transformers`` causal LM built from ``config`` (fresh weights) with the demo's call:
    ``model(idx, targets)`` is the mean next-byte cross-entropy."""

    def __init__(self, config) -> None:
        super().__init__()
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_config(config)
        self.description = f"{config.model_type} ({type(self.model).__name__}, from --hf-config)"

    def num_parameters(self) -> int:
        """Number of parameters (embeddings included)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``idx`` [batch, seq] int64 -> the mean cross-entropy of the logits against ``targets``."""
        logits = self.model(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

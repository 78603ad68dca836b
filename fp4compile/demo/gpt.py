"""A compact byte-level GPT in plain torch, for ``fp4compile train`` and ``fp4compile explain``.

Token and position embeddings, pre-LayerNorm blocks (causal attention through
``F.scaled_dot_product_attention``, a GELU MLP), a final LayerNorm and an untied ``lm_head``
(every recipe keeps the module named ``lm_head`` in high precision). Every linear has a bias-free
weight whose dims are multiples of 16 when ``d_model`` is, so the ``nvfp4`` backend rewrites all of
them except the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "demo_batch", "demo_model"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`.

    Attributes:
        vocab_size: 256 for bytes.
        seq_len: the longest sequence (size of the position embedding).
        d_model: width of the residual stream (a multiple of 16 and of ``n_heads``).
        n_layers: number of transformer blocks.
        n_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP over ``d_model``.
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % 16:
            raise ValueError(f"d_model must be a multiple of 16 (the NVFP4 block size), got {self.d_model}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused ``qkv`` projection, SDPA, an output ``proj``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [batch, seq, d_model] -> same shape."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``fc`` (d -> ratio * d), GELU (tanh approximation), ``proj`` back to d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d_model] -> same shape."""
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [batch, seq, d_model] -> same shape."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level decoder-only transformer; ``model(idx)`` gives logits, ``model(idx, targets)`` the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm weights and biases keep their ones / zeros
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def num_parameters(self) -> int:
        """Number of parameters (embeddings included)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``idx`` [batch, seq] int64 -> logits [batch, seq, vocab], or the mean cross-entropy if ``targets``."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def demo_model(seed: int = 0) -> GPT:
    """A small GPT (2 layers, d_model 64, 4 heads, seq 32) with a fixed initialization, for ``explain``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(GPTConfig(seq_len=32, d_model=64, n_layers=2, n_heads=4))


def demo_batch(batch: int = 2, seq: int = 32) -> torch.Tensor:
    """A batch of bytes of a small Python snippet, [batch, seq] int64, for ``demo_model``."""
    text = b"def greet(name):\n    return f'hello, {name}!'\n\n"
    data = torch.tensor(list(text * (batch * seq // len(text) + 1)), dtype=torch.long)
    return torch.stack([data[i * seq : (i + 1) * seq] for i in range(batch)])

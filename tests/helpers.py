"""Tiny models built in code for tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128, attn: str = "eager", **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        **overrides,
    )
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config)


def tiny_gpt2(layers: int = 2, hidden: int = 32, vocab: int = 128):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config)


class TwoLayer(nn.Module):
    """A plain model: Linear(in→hidden, bias) → tanh → Linear(hidden→out, no bias)."""

    def __init__(self, d_in: int = 10, hidden: int = 14, d_out: int = 6) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))

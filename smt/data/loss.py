"""Causal-LM training loss with logits only where a label is.

Instruction tuning masks the prompt (label -100), and LLM-Adapters prompts are ~10× longer than their
answers. A transformers ``...ForCausalLM`` still projects every position onto the vocabulary: for a
135M model with a 49k vocabulary that is ~200 KB of logits per token, several copies kept for backward,
more activation memory than the rest of the network, and a vocabulary-sized matmul for every prompt
token. Here the decoder body runs as usual and only the hidden states that predict a label go through
the output head; the loss is the same mean over labelled tokens (equal to transformers' within fp32
rounding).

Only for architectures whose head is a plain projection (no logit scaling or soft-capping); anything
else returns None and the caller uses the model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo2"})
"""``model_type`` values whose logits are ``lm_head(last_hidden_state)`` and nothing else."""


def labelled_positions_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean next-token cross-entropy over labelled positions, or None when ``model`` is not a plain decoder.

    Args:
        model: a transformers causal LM, possibly wrapped by peft (its LoRA layers live inside, so they run).
        batch: ``input_ids``, ``labels`` (``-100`` = no loss), optional ``attention_mask`` / ``position_ids``.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = _body_and_head(causal_lm)
    if parts is None:
        return None
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if _has_forward_hooks(causal_lm):
        # FSDP2 (and other wrappers) gather parameters in the model's own forward hooks: go through it, and keep
        # the positions labelled in any row (transformers' ``logits_to_keep`` is shared by the batch).
        positions = keep.any(0).nonzero().flatten()
        logits = causal_lm(**inputs, use_cache=False, logits_to_keep=positions).logits
        return F.cross_entropy(logits[keep[:, positions]].float(), targets[:, positions][keep[:, positions]])
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _body_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    body = getattr(causal_lm, "base_model", causal_lm)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if body is causal_lm or head is None:
        return None
    return body, head

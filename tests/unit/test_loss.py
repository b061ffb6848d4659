"""``labelled_positions_loss`` equals transformers' own loss and gradients while projecting labelled positions only."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from smt.data.loss import labelled_positions_loss


def batch(vocab: int, prompt: list[int], length: int = 12) -> dict[str, torch.Tensor]:
    """Two rows, right-padded, prompts masked: the shape the data module produces."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (len(prompt), length))
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for row, p in enumerate(prompt):
        labels[row, :p] = -100
    labels[1, -3:], mask[1, -3:] = -100, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_equals_the_models_own_loss_and_gradients(build):
    torch.manual_seed(0)
    model = build().eval()  # no dropout: both losses must see the same network
    data = batch(model.config.vocab_size, [7, 5])
    expected = model(**data, use_cache=False).loss
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    loss = labelled_positions_loss(model, data)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_only_labelled_positions_reach_the_head():
    model = tiny_llama()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    data = batch(model.config.vocab_size, [9, 6])
    labelled_positions_loss(model, data)
    assert seen == [int((data["labels"][:, 1:] != -100).sum())]  # 2 + 2 of 22 positions


def test_peft_wrapped_model_runs_its_lora_layers():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    data = batch(128, [4, 4])
    torch.testing.assert_close(labelled_positions_loss(model, data), model(**data).loss, rtol=1e-6, atol=1e-6)


def test_other_heads_fall_back_to_the_models_loss():
    model = tiny_llama()
    model.config.model_type = "gemma2"  # soft-capped logits: not a plain head
    assert labelled_positions_loss(model, batch(128, [4, 4])) is None


def test_hooked_models_go_through_their_own_forward():
    """FSDP2 gathers parameters in the root module's forward hooks: those must run, with the same loss."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    data = batch(model.config.vocab_size, [7, 5])
    expected = model(**data, use_cache=False).loss
    calls.clear()
    torch.testing.assert_close(labelled_positions_loss(model, data), expected, rtol=1e-6, atol=1e-6)
    assert calls == [1]

"""Checkpoints of a pretrained base keep only the tuned slots and the bank; resume and export still work."""

from pathlib import Path

import torch
from helpers import tiny_llama

from smt.core.model import get_bank
from smt.lightning.cli import main
from smt.lightning.export import model_from_checkpoint

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def _base_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    tiny_llama(hidden=64, vocab=384).save_pretrained(folder)
    return folder


def _args(base: Path, train_file: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIG), f"--data.train_path={train_file}", f"--model.model={base}",
            "--model.model_config=null", "--model.tokenizer=bytes", "--model.delta_path=null",
            "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=4",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.dirpath=ckpt", *extra]  # fmt: skip


def test_slim_checkpoint_resumes_and_exports(tmp_path, train_file):
    base = _base_folder(tmp_path)
    assert main(_args(base, train_file, "--trainer.max_steps=8")) == 0
    step4, step8 = Path("ckpt/epoch=0-step=4.ckpt"), Path("ckpt/epoch=0-step=8.ckpt")
    checkpoint = torch.load(step8, weights_only=True)
    assert checkpoint["smt_slim"] and all(k.startswith("model.smt_bank.") for k in checkpoint["state_dict"])
    assert step8.stat().st_size < 200_000  # the 4 slots and the map, not the base model

    # Resuming mid-epoch restarts the shuffled epoch (Lightning cannot rewind this loader), so compare the slim
    # resume with a full-checkpoint resume from the same step: both see the same data, only slimness differs.
    assert main(_args(base, train_file, "--trainer.max_steps=8", "--model.slim_checkpoints=false",
                      "--trainer.callbacks.dirpath=full")) == 0  # fmt: skip
    full = torch.load("full/epoch=0-step=4.ckpt", weights_only=True)
    assert len(full["state_dict"]) > len(checkpoint["state_dict"]) and "smt_slim" not in full
    for source, out in ((step4, "resumed_slim"), (Path("full/epoch=0-step=4.ckpt"), "resumed_full")):
        assert main(_args(base, train_file, "--trainer.max_steps=8", f"--ckpt_path={source}",
                          f"--trainer.callbacks.dirpath={out}")) == 0  # fmt: skip
    slim_end = torch.load("resumed_slim/epoch=0-step=8.ckpt", weights_only=True)["state_dict"]
    full_end = torch.load("resumed_full/epoch=0-step=8.ckpt", weights_only=True)["state_dict"]
    for key, value in slim_end.items():
        if torch.is_tensor(value):
            assert torch.equal(full_end[key], value), key

    module = model_from_checkpoint(step8)
    bank = get_bank(module.model)
    assert bank.tuning and torch.equal(bank.map, checkpoint["state_dict"]["model.smt_bank.map"])
    fresh_base = type(module.model).from_pretrained(base)
    assert torch.equal(module.model.lm_head.weight, fresh_base.lm_head.weight)  # the base came back from `model`


def test_slim_checkpoint_of_a_tied_head_leaves_out_both_names_and_resumes(tmp_path, train_file):
    """A tied head (lm_head = embed_tokens, SmolLM2's) is in the state dict under two names: neither is saved."""
    base = tmp_path / "tied"
    tiny_llama(hidden=64, vocab=384, tie_word_embeddings=True).save_pretrained(base)
    assert main(_args(base, train_file, "--trainer.max_steps=4")) == 0
    checkpoint = torch.load("ckpt/epoch=0-step=4.ckpt", weights_only=True)
    assert all(k.startswith("model.smt_bank.") for k in checkpoint["state_dict"])
    assert main(_args(base, train_file, "--trainer.max_steps=8", "--ckpt_path=ckpt/epoch=0-step=4.ckpt")) == 0
    module = model_from_checkpoint(Path("ckpt/epoch=0-step=8.ckpt"))
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight  # still tied after the reload
    assert torch.equal(module.model.lm_head.weight, type(module.model).from_pretrained(base).lm_head.weight)

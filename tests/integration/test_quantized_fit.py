"""``smt fit`` on a 4-bit base with 8-bit AdamW (``configs/debug-nf4.yaml``), resume, export, bad input.

Everything runs in-process through ``smt.lightning.cli`` on CPU with real bitsandbytes layers.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from smt import read_delta
from smt.core.layer import SparseBlockLinear
from smt.core.model import get_bank
from smt.lightning.cli import main, run_lightning
from smt.lightning.export import load_checkpoint, model_from_checkpoint

bnb = pytest.importorskip("bitsandbytes")

NF4_CONFIG = REPO / "configs" / "debug-nf4.yaml"


def nf4_args(train_file: Path, *overrides: str) -> list[str]:
    return ["--config", str(NF4_CONFIG), "--data.train_path", str(train_file), *overrides]


@pytest.fixture(scope="module")
def nf4_fit(tmp_path_factory, train_file, pretrained_folder):
    """8 steps of ``smt fit`` on the nf4 folder base (slim checkpoints) with adamw8bit; a step-4 checkpoint too."""
    root = tmp_path_factory.mktemp("nf4_fit")
    folder_base = [f"--model.model={pretrained_folder}", "--model.model_config=null"]
    step_checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                        "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
                        f"--trainer.callbacks.dirpath={root / 'steps'}",
                        "--trainer.callbacks.filename={step}"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        cli = run_lightning(["fit", *nf4_args(train_file, *folder_base, *step_checkpoints)])
    steps = root / "steps"
    return SimpleNamespace(cli=cli, folder_base=folder_base, final=steps / "step=8.ckpt", step4=steps / "step=4.ckpt")


def test_fit_on_the_debug_nf4_config_with_adamw8bit(train_file):
    """The shipped config as written (random base quantized after construction, full checkpoint)."""
    cli = run_lightning(["fit", *nf4_args(train_file, "--trainer.max_steps=5", "--trainer.limit_val_batches=0")])
    model = cli.model.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, SparseBlockLinear) and type(q_proj.base) is bnb.nn.Linear4bit
    assert q_proj.forward_mode == "additive" and q_proj.base.weight.quant_state.quant_type == "nf4"
    assert type(model.model.layers[0].mlp.up_proj) is bnb.nn.Linear4bit and type(model.lm_head) is torch.nn.Linear
    optimizer = cli.trainer.optimizers[0]
    bank = get_bank(model)
    assert type(optimizer) is bnb.optim.AdamW8bit
    assert all(optimizer.state[slot]["state1"].dtype == torch.uint8 for slot in bank.slots)
    assert bank.tuning and any(slot.any() for slot in bank.slots)
    selection, deltas, metadata = read_delta("runs/debug-nf4/delta.safetensors")  # the usual format
    assert metadata["format"] == "smt.delta" and metadata["dtype"] == "bfloat16"
    assert selection.num_blocks == 4 and all(d.shape[1:] == (16, 16) for d in deltas.values())


def test_folder_base_writes_a_slim_checkpoint_without_quantized_storage(nf4_fit):
    assert nf4_fit.cli.trainer.global_step == 8
    checkpoint = nf4_fit.final
    state = load_checkpoint(checkpoint)["state_dict"]
    assert checkpoint.stat().st_size < 200_000 and load_checkpoint(checkpoint)["smt_slim"]
    assert not any(".absmax" in key or key.endswith("proj.weight") for key in state)
    assert {k for k in state if "slots" in k} == {f"model.smt_bank.slots.{i}" for i in range(4)}


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_a_quantized_run_matches_the_uninterrupted_one(nf4_fit, train_file):
    """From step 4 (after the selection; 8-bit AdamW state, quantized base from the folder) to step 8."""
    checkpoint = nf4_fit.step4
    resumed = run_lightning(["fit", *nf4_args(train_file, *nf4_fit.folder_base, f"--ckpt_path={checkpoint}")])
    assert resumed.trainer.global_step == 8
    slots = get_bank(resumed.model.model).slots
    expected = get_bank(nf4_fit.cli.model.model).slots
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(slots, expected))


def test_export_merges_dequantized_in_bf16_or_requantizes_with_an_error_bound(nf4_fit, capsys):
    from transformers import AutoModelForCausalLM

    checkpoint = nf4_fit.final
    tuned = model_from_checkpoint(checkpoint).model.eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits

    assert main(["export", str(checkpoint), "--delta", "out/delta.safetensors", "--merged", "out/merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained("out/merged", local_files_only=True, dtype=torch.float32).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert float((got - expected).abs().max()) < 0.02 * float(expected.abs().max())  # bf16 rounding of deq(Q) + Δ

    assert main(["export", str(checkpoint), "--merged", "out/requantized", "--requantize"]) == 0
    printed = capsys.readouterr().out
    assert "max |W_requant − (W0 + Δ)| = " in printed and "max |Δ|" in printed
    requantized = AutoModelForCausalLM.from_pretrained("out/requantized", local_files_only=True, device_map="cpu")
    assert type(requantized.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit


def test_bad_quantization_input_is_a_one_line_error(train_file, capsys, monkeypatch):
    assert main(["fit", *nf4_args(train_file, "--model.quantization=nf3")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["smt: error: model.quantization='nf3' is not one of none, nf4, fp4, int8"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    assert main(["fit", *nf4_args(train_file)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("smt: error: model.quantization='nf4' needs bitsandbytes, which does not import")


def test_full_warmup_on_a_quantized_base_is_refused_in_one_line_before_training(train_file, capsys, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    overrides = ("--smt.warmup_updates=full", "--smt.warmup_lr=0.003", "--model.slim_checkpoints=false")
    assert main(["fit", *nf4_args(train_file, *overrides)]) != 0
    (line,) = [row for row in capsys.readouterr().err.strip().splitlines() if "warmup_updates" in row]
    assert line.startswith("smt: error: smt.warmup_updates=full") and "model.quantization=none" in line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.safetensors"))  # nothing trained

"""The ``smt`` command end to end on ``configs/debug.yaml`` (tiny random Llama, byte tokenizer, CPU).

``smt fit`` runs once per module (in-process through ``smt.lightning.cli.main``) and the tests read what it wrote:
checkpoint, delta file, selection and heatmap, the CSV log. ``smt select``, ``smt fit --smt.selection_path``,
``smt export`` and ``--optimizer`` build on it.
"""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG_CONFIG

from smt import Selection, read_delta, trainable_summary
from smt.core.model import get_bank
from smt.lightning.callback import SparseMatrixTuning
from smt.lightning.cli import main, run_lightning
from smt.lightning.export import load_checkpoint, model_from_checkpoint

BLOCKS, BLOCK = 4, 16  # configs/debug.yaml: num_blocks 4 of 16×16 over q_proj and v_proj
TARGETS = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSV_LOGGER = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=logs"]


def debug_args(train_file: Path, *overrides: str) -> list[str]:
    return ["--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), *overrides]


def smt_callback(cli) -> SparseMatrixTuning:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, SparseMatrixTuning))


def write_boolq_records(path: Path) -> Path:
    """Four BoolQ-style test records: scored by likelihood over true/false, no generation."""
    rows = [
        {"instruction": f"Is {n} even? Answer format: true/false", "input": "", "output": "", "answer": str(n % 2 == 0)}
        for n in range(4)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def blocks_of(selection: Selection) -> dict[str, list]:
    """Module → blocks, leaving out modules without any (a selection file lists them, a delta file does not)."""
    return {name: index.tolist() for name, index in selection.blocks.items() if len(index)}


@pytest.fixture(scope="module")
def debug_fit(tmp_path_factory, train_file):
    """``smt fit --config configs/debug.yaml`` with a CSV logger, run in a fresh folder."""
    root = tmp_path_factory.mktemp("debug_fit")
    logger = CSV_LOGGER
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        code = main(["fit", *debug_args(train_file, *logger)])
    checkpoints = sorted(root.rglob("*.ckpt"))
    return SimpleNamespace(root=root, code=code, checkpoints=checkpoints, run=root / "runs" / "debug")


def test_fit_writes_checkpoint_delta_selection_and_heatmap(debug_fit):
    assert debug_fit.code == 0
    assert len(debug_fit.checkpoints) == 1
    checkpoint = load_checkpoint(debug_fit.checkpoints[0])
    assert checkpoint["global_step"] == 8
    state = checkpoint["state_dict"]
    assert state["model.smt_bank.map"].shape == (BLOCKS, 3)
    assert [state[f"model.smt_bank.slots.{i}"].shape for i in range(BLOCKS)] == [(BLOCK, BLOCK)] * BLOCKS
    assert any(state[f"model.smt_bank.slots.{i}"].any() for i in range(BLOCKS))  # Δ was trained
    callback_state = next(v for k, v in checkpoint["callbacks"].items() if "SparseMatrixTuning" in k)
    assert callback_state["phase"] == "tuning" and callback_state["steps_scored"] == 3

    selection = Selection.load(debug_fit.run / "selection.safetensors")
    assert selection.num_blocks == BLOCKS and selection.warmup_steps == 3 and selection.criterion == "grad_sq"
    assert set(selection.grids) == TARGETS
    assert (debug_fit.run / "selection.png").read_bytes()[:8] == PNG_MAGIC

    delta_selection, deltas, metadata = read_delta(debug_fit.run / "delta.safetensors")
    assert blocks_of(delta_selection) == blocks_of(selection)
    assert metadata["dtype"] == "bfloat16"
    assert all(d.shape[1:] == (BLOCK, BLOCK) for d in deltas.values()) and any(d.any() for d in deltas.values())


def test_fit_logs_finite_losses_and_the_warmup_countdown(debug_fit):
    (metrics_file,) = debug_fit.root.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    val_losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val_losses) == 2 and all(math.isfinite(v) for v in val_losses)  # val_check_interval 4 of 8 steps
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train_losses) == 8 and all(math.isfinite(v) for v in train_losses)
    countdown = [float(r["smt/warmup_left"]) for r in rows if r.get("smt/warmup_left")]
    assert countdown == [2.0, 1.0] + [0.0] * 6


def test_fit_with_a_logger_and_the_debug_config_as_written(train_file):
    """The model's ``tokenizer: bytes`` and the data's unset tokenizer once clashed in the logger's merged hparams."""
    overrides = [*CSV_LOGGER, "--trainer.max_steps=4", "--trainer.limit_val_batches=0"]
    assert main(["fit", *debug_args(train_file, *overrides)]) == 0
    assert list(Path("logs").rglob("hparams.yaml"))


def test_fit_trains_exactly_the_budgeted_parameters(debug_fit):
    module = model_from_checkpoint(debug_fit.checkpoints[0])
    summary = trainable_summary(module.model)
    assert summary.trainable == BLOCKS * BLOCK * BLOCK == summary.tuned_weights
    assert summary.by_type == {"smt slots": BLOCKS * BLOCK * BLOCK}
    assert [n for n, p in module.named_parameters() if p.requires_grad] == [
        f"model.smt_bank.slots.{i}" for i in range(BLOCKS)
    ]


def test_select_then_fit_with_selection_path_skips_the_warmup(debug_fit, train_file, tmp_path):
    assert main(["select", *debug_args(train_file), "--out", "chosen/selection.safetensors"]) == 0
    chosen = Path("chosen/selection.safetensors")
    assert chosen.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("delta*"))  # select writes nothing else
    selection = Selection.load(chosen)
    assert blocks_of(selection) == blocks_of(Selection.load(debug_fit.run / "selection.safetensors"))

    cli = run_lightning(["fit", *debug_args(train_file, f"--smt.selection_path={chosen}", "--trainer.max_steps=1")])
    callback, bank = smt_callback(cli), get_bank(cli.model.model)
    assert callback.steps_scored == 0 and callback.phase == "tuning" and callback.warmup_offset == 0
    assert {n: i.tolist() for n, i in bank.blocks().items() if len(i)} == blocks_of(selection)
    assert any(slot.any() for slot in bank.slots)  # the very first optimizer step trained the blocks
    assert not Path("runs/debug/selection.safetensors").exists()  # no new selection was made


def test_export_writes_a_delta_and_a_merged_model_plain_transformers_loads(debug_fit, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = str(debug_fit.checkpoints[0])
    assert main(["export", checkpoint, "--delta", "out/delta.safetensors", "--merged", "out/merged"]) == 0

    _, exported, _ = read_delta("out/delta.safetensors")
    _, written_by_fit, _ = read_delta(debug_fit.run / "delta.safetensors")
    assert exported.keys() == written_by_fit.keys()
    assert all(torch.equal(exported[name], written_by_fit[name]) for name in exported)

    tuned = model_from_checkpoint(checkpoint).model.eval()
    merged = AutoModelForCausalLM.from_pretrained("out/merged", local_files_only=True, attn_implementation="eager")
    merged.eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("smt" in k for k in merged.state_dict())
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, tuned(input_ids=ids).logits)


def test_test_with_ckpt_path_evaluates_the_tuned_blocks(debug_fit, train_file, tmp_path):
    test_file = write_boolq_records(tmp_path / "boolq" / "test.json")  # the task comes from the folder name
    checkpoint = debug_fit.checkpoints[0]
    args = [f"--data.test_paths=[{test_file}]", f"--ckpt_path={checkpoint}"]
    cli = run_lightning(["test", *debug_args(train_file, *args)])
    bank = get_bank(cli.model.model)
    assert bank.tuning
    saved = load_checkpoint(checkpoint)["state_dict"]
    assert all(torch.equal(slot, saved[f"model.smt_bank.slots.{i}"]) for i, slot in enumerate(bank.slots))
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc_boolq"]) <= 1.0


def test_test_with_ckpt_path_keeps_model_overrides(debug_fit, train_file, tmp_path):
    """LightningCLI re-parses a checkpoint's hparams over the command line; smt keeps the user's ``--model.*``."""
    test_file = write_boolq_records(tmp_path / "boolq" / "test.json")
    checkpoint = debug_fit.checkpoints[0]
    args = [f"--data.test_paths=[{test_file}]", "--model.results_path=results.json", f"--ckpt_path={checkpoint}"]
    run_lightning(["test", *debug_args(train_file, *args)])
    assert Path("results.json").is_file()


def test_optimizer_from_the_command_line_holds_the_bank_slots(train_file):
    args = ["--optimizer=torch.optim.SGD", "--optimizer.lr=0.5", "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size=2", "--trainer.max_steps=5", "--trainer.limit_val_batches=0"]  # fmt: skip
    cli = run_lightning(["fit", *debug_args(train_file, *args)])
    optimizer = cli.trainer.optimizers[0]
    bank = get_bank(cli.model.model)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.5
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in bank.slots} and len(held) == BLOCKS
    assert cli.trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert any(slot.any() for slot in bank.slots)  # SGD trained them after the warm-up

"""Validation and step checkpoints must not change what ``smt fit`` trains, on every kind of base.

The matrix: base {random ``model_config``, ``save_pretrained`` folder} × quantization {none, nf4, int8} ×
validation {on, off} × step checkpoint {on, off}, through the real CLI (``configs/debug-nf4.yaml``, 8 steps,
warm-up 3, validation every 4 steps). Per (base, quantization) the four runs must end with *identical* slots,
not all zero, and a resume from the step-4 checkpoint must reach them too.

Why this matrix: bitsandbytes repacked 4-bit weights on the first eval-mode forward (the sanity check) into a
layout with no backward, so a quantized folder base with validation and a step checkpoint trained nothing —
silently, exit 0. Validation and checkpointing must never change the training.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from smt.core.model import get_bank
from smt.lightning.cli import run_lightning

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings(
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

CONFIG = REPO / "configs" / "debug-nf4.yaml"
CASES = [(base, quantization) for base in ("random", "folder") for quantization in ("none", "nf4", "int8")]
COMBINATIONS = [(validation, checkpoint) for validation in (True, False) for checkpoint in (True, False)]


def fit(folder: Path, train_file: Path, base_args: list[str], validation: bool, checkpoint: bool, *extra: str):
    """One in-process ``smt fit`` in ``folder``; returns the CLI object and the step-checkpoint folder."""
    steps = folder / "steps"
    args = ["fit", "--config", str(CONFIG), "--data.train_path", str(train_file), *base_args]
    args.append(f"--trainer.limit_val_batches={int(validation)}")  # one batch is enough to run eval mode
    if checkpoint:
        args += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
                 f"--trainer.callbacks.dirpath={steps}", "--trainer.callbacks.filename={step}"]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli = run_lightning([*args, *extra])
    return cli, steps


def final_slots(cli) -> list[torch.Tensor]:
    assert cli.trainer.global_step == 8
    return [slot.detach().clone() for slot in get_bank(cli.model.model).slots]


def base_args(base: str, quantization: str, pretrained_folder: Path) -> list[str]:
    args = [f"--model.quantization={quantization}"]
    if quantization == "none":
        args.append("--model.optimizer=adamw")  # the float path with torch's AdamW; quantized bases keep adamw8bit
    if base == "folder":
        args += [f"--model.model={pretrained_folder}", "--model.model_config=null"]
    return args


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """30 CLI runs of a 64-wide model: one intra-op thread. Two threads on shared cores spin against each other
    (measured under load: 7.0 s of CPU per run with two, 1.1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=[f"{base}-{q}" for base, q in CASES])
def matrix(request, tmp_path_factory, train_file, pretrained_folder):
    """The four (validation, checkpoint) runs of one (base, quantization), and a resume from step 4."""
    base, quantization = request.param
    root = tmp_path_factory.mktemp(f"{base}-{quantization}")
    args = base_args(base, quantization, pretrained_folder)
    slots, step4 = {}, None
    for validation, checkpoint in COMBINATIONS:
        cli, steps = fit(root / f"val{int(validation)}-ckpt{int(checkpoint)}", train_file, args, validation, checkpoint)
        slots[validation, checkpoint] = final_slots(cli)
        if validation and checkpoint:
            step4 = steps / "step=4.ckpt"
    resumed, _ = fit(root / "resumed", train_file, args, True, True, f"--ckpt_path={step4}")
    return SimpleNamespace(slots=slots, resumed=final_slots(resumed))


def test_the_run_trains(matrix):
    assert any(slot.abs().max() > 0 for slot in matrix.slots[True, True])


@pytest.mark.parametrize("combination", COMBINATIONS[1:], ids=["val-only", "ckpt-only", "neither"])
def test_validation_and_checkpoints_do_not_change_training(matrix, combination):
    reference = matrix.slots[True, True]
    assert all(torch.equal(a, b) for a, b in zip(matrix.slots[combination], reference, strict=True))


def test_resume_from_the_mid_run_checkpoint_reaches_the_same_slots(matrix):
    assert all(torch.equal(a, b) for a, b in zip(matrix.resumed, matrix.slots[True, True], strict=True))

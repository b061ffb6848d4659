"""``make quickstart`` without the real model: its config, its task files and its whole run on a tiny model.

``test_shipped_configs.py`` checks that every config parses; this adds what only the quickstart promises: the
SmolLM2 folder ``scripts/prepare_smollm2.py`` writes, one pass over the training slice, a block size and budget
that fit SmolLM2's q/k/v shapes at about the papers' density, the offline fallback task (generated GSM8K-style
problems whose answers are right), and ``scripts/quickstart.py``'s evaluate → fit → evaluate → report on a tiny
random Llama with the byte tokenizer in place of SmolLM2.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import operator
import re
import time
from pathlib import Path

import pytest
import yaml
from helpers import import_script

from smt.lightning.cli import main
from smt.lightning.pretrained import DEFAULT_SMOLLM2_DIR

ROOT = Path(__file__).resolve().parents[2]
quickstart = import_script("quickstart")

CONFIG = ROOT / "configs" / "quickstart.yaml"
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SMOLLM2_QKV_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576)}


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The config as ``smt fit --config configs/quickstart.yaml --print_config`` resolves it (nothing is built)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_opens_with_the_launch_command() -> None:
    head = CONFIG.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in head)
    assert any("smt fit --config configs/quickstart.yaml" in line for line in head)


def test_model_and_task(resolved: dict) -> None:
    assert Path(resolved["model"]["model"]) == DEFAULT_SMOLLM2_DIR
    assert resolved["model"]["dtype"] == "float32"  # bf16 only where the script finds a native bf16 GEMM
    data, folder = resolved["data"], quickstart.TASK_DIR
    assert data["template"] == "gsm8k" and data["test_tasks"] == ["gsm8k"]
    assert Path(data["train_path"]).parent == Path(data["val_path"]).parent == folder  # what the script writes
    assert [Path(p).name for p in data["test_paths"]] == ["samples.jsonl"]
    assert resolved["trainer"]["accelerator"] == "cpu" and resolved["trainer"]["logger"] in (None, True)


def test_one_pass_over_the_training_slice(resolved: dict) -> None:
    data, trainer = resolved["data"], resolved["trainer"]
    assert data["limit_train"] == trainer["max_steps"] * data["batch_size"]
    assert trainer["max_steps"] % trainer["val_check_interval"] == 0  # the last step is validated


def test_smt_budget_fits_smollm2(resolved: dict) -> None:
    from smt.lightning.callback import SparseMatrixTuning

    smt = resolved["smt"]
    SparseMatrixTuning(**smt)  # the callback validates its own arguments
    size = smt["block_size"]
    blocks_per_layer = sum((rows // size) * (cols // size) for rows, cols in SMOLLM2_QKV_SHAPES.values())
    assert all(rows % size == 0 and cols % size == 0 for rows, cols in SMOLLM2_QKV_SHAPES.values())
    density = smt["num_blocks"] / (30 * blocks_per_layer)  # 30 layers
    assert 0.005 <= density <= 0.015  # about the papers' 0.84 % of q, k, v
    assert smt["warmup_steps"] < resolved["trainer"]["max_steps"] // 2


def test_generated_fallback_problems_have_right_answers_in_gsm8k_format(tmp_path) -> None:
    what = quickstart.write_task(tmp_path, val_size=8)  # no ../shared/data from tmp_path
    assert "generated" in what and "not GSM8K" in what
    rows = {split: [json.loads(line) for line in (tmp_path / f"{split}.jsonl").open()] for split in quickstart.SPLITS}
    assert [len(rows[split]) for split in ("val", "samples")] == [8, quickstart.SAMPLES]
    questions = {split: {row["question"] for row in rows[split]} for split in quickstart.SPLITS}
    held_out = questions["samples"] | questions["val"]
    assert len(held_out) == 8 + quickstart.SAMPLES and not held_out & questions["train"]  # all disjoint
    for row in rows["train"][:50]:
        notes = re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", row["answer"])  # GSM8K's calculator notes
        assert notes and all(OPERATORS[op](int(a), int(b)) == int(result) for a, op, b, result in notes)
        assert row["answer"].endswith(f"#### {notes[-1][3]}")


def test_generations_are_checked_for_the_final_answer_line() -> None:
    assert quickstart.ends_with_an_answer("She has 3 + 4 = 7.\n#### 7")
    assert not quickstart.ends_with_an_answer("The answer is 7.")


def test_bf16_is_picked_only_on_a_cpu_with_a_native_bf16_gemm(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not quickstart.bf16_is_fast()


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384}  # fmt: skip


def test_quickstart_runs_end_to_end_on_a_tiny_model(monkeypatch, capsys) -> None:
    """``scripts/quickstart.py``'s run in the test's folder, SmolLM2 replaced by a tiny random Llama."""
    from smt.lightning import run_logs

    monkeypatch.setattr(run_logs, "tensorboard_available", lambda: False)
    what = quickstart.write_task(quickstart.TASK_DIR, val_size=8)
    tiny = ["--model.model=null", f"--model.model_config={json.dumps(TINY_LLAMA)}", "--model.tokenizer=bytes",
            "--model.max_new_tokens=8", "--data.max_length=256", "--data.limit_train=16", "--trainer.max_steps=4",
            "--trainer.val_check_interval=2", "--smt.block_size=16", "--smt.num_blocks=4", "--smt.warmup_steps=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    cli = quickstart.run(tiny, what, {"start": time.perf_counter()})
    report = capsys.readouterr().out
    assert "generated word problems in GSM8K's format (not GSM8K)" in report
    (row,) = [line for line in report.splitlines() if line.startswith("held-out loss")]
    before, after = (float(value) for value in row.split()[-2:])
    assert math.isfinite(before) and math.isfinite(after)
    assert report.count("--- held-out problem") == quickstart.SAMPLES and report.count("\nafter:  ") == 3
    assert "generations ending in #### <number>" in report and "time:" in report
    assert cli.trainer.global_step == 4 and Path("runs/quickstart/delta.safetensors").is_file()
    (metrics,) = Path("runs/quickstart/lightning_logs").rglob("metrics.csv")
    columns = next(csv.reader(metrics.open()))
    assert {"train/loss", "val/loss", "lr-AdamW", "smt/tuned_weights", "smt/skipped_steps"} <= set(columns)

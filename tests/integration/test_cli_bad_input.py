"""Bad input through the ``smt`` command: one ``smt: error:`` line on stderr, exit code 2, nothing written.

Each case runs ``smt.lightning.cli.main`` in-process in an empty folder holding only its inputs; one case also runs
the installed console script in a subprocess, to see the stderr a user sees.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEBUG_CONFIG

from smt.core.selection import Selection
from smt.kernels.blocks import BlockGrid
from smt.lightning.cli import main


def write_fieldless_data(folder: Path) -> Path:
    path = folder / "bodies.json"
    path.write_text('[{"body": "a"}, {"body": "b"}, {"body": "c"}]')
    return path


def write_selection_for_another_model(folder: Path) -> Path:
    """A valid selection of the debug model's module names, made for a Llama of hidden size 32 (not 64)."""
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    grids = {name: BlockGrid(32, 32, 16, 16) for name in names}
    blocks = {names[0]: torch.tensor([[0, 0], [1, 1]]), names[1]: torch.tensor([[0, 1], [1, 0]])}
    selection = Selection(blocks, grids, "grad_sq", {"num_blocks": 4}, 3, "llama-hidden-32")
    return selection.save(folder / "other.safetensors")


def fit_args(train_file: Path, *overrides: str) -> list[str]:
    return ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), *overrides]


CASES = {
    "unknown model path": (
        lambda folder, train: fit_args(
            train, "--model.model_config=null", f"--model.model={folder / 'no-such-model'}", "--model.tokenizer=null"
        ),
        "model.model=",
    ),
    "data without the needed fields": (lambda folder, train: fit_args(write_fieldless_data(folder)), "instruction"),
    "num_blocks and density both set": (
        lambda folder, train: fit_args(train, "--smt.density=0.01"),
        "smt.num_blocks and smt.density are both set",
    ),
    "selection file for another model": (
        lambda folder, train: fit_args(train, f"--smt.selection_path={write_selection_for_another_model(folder)}"),
        "does not fit this model",
    ),
    "export of a missing checkpoint": (
        lambda folder, train: ["export", str(folder / "missing.ckpt"), "--delta", "delta.safetensors"],
        "does not exist",
    ),
}


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def assert_refused(code: int, stderr: str, expected: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("smt: error:")]
    assert code == 2
    assert len(errors) == 1 and expected in errors[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_error_and_writes_nothing(case, tmp_path, train_file, capsys):
    make_args, expected = CASES[case]
    args = make_args(tmp_path, train_file)
    inputs = files_under(tmp_path)
    code = main(args)
    assert_refused(code, capsys.readouterr().err, expected)
    assert files_under(tmp_path) == inputs  # no checkpoint, delta, selection, heatmap or config


def test_warmup_longer_than_the_run_is_refused_at_setup(tmp_path, train_file, capsys):
    # 32 training records, batch 4: one epoch has 8 optimizer steps, the warm-up asks for 100.
    args = fit_args(train_file, "--smt.warmup_steps=100", "--trainer.max_steps=-1", "--trainer.max_epochs=1")
    code = main(args)
    assert_refused(code, capsys.readouterr().err, "warmup_steps")
    assert files_under(tmp_path) == set()


def test_fit_stopped_inside_the_warmup_writes_no_delta(train_file):
    stop = "--trainer.callbacks+=plain_modules.StopAfterSteps"  # stops after 1 optimizer step; the warm-up has 3
    assert main(fit_args(train_file, stop, "--trainer.enable_checkpointing=false")) == 0
    assert not Path("runs/debug/delta.safetensors").exists()


@pytest.fixture(scope="module")
def console_run(tmp_path_factory, train_file):
    """The installed ``smt`` script with both budgets set, as a user would run it."""
    smt = Path(sys.executable).with_name("smt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}
    return subprocess.run(
        [str(smt), *fit_args(train_file, "--smt.density=0.01")],
        cwd=tmp_path_factory.mktemp("console"), capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_console_script_exits_2_with_one_error_line(console_run):
    assert_refused(console_run.returncode, console_run.stderr, "smt.num_blocks and smt.density are both set")
    assert console_run.stdout == ""


def test_console_script_prints_no_lightning_args_warning(console_run):
    assert "args parameter is intended" not in console_run.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--smt.block_size=0", "smt.block_size=0 has rows=0"),
        ("--smt.criterion=nope", "smt.criterion='nope' is not one of"),
        ("--smt.warmup_steps=0", "smt.warmup_steps=0 needs a selection_path"),
    ],
)
def test_settings_are_checked_before_any_model_loads(override, expected, tmp_path, train_file, capsys):
    """The model named here does not exist: the error must be the setting's, found before loading it."""
    missing = ["--model.model_config=null", f"--model.model={tmp_path / 'no-such-model'}", "--model.tokenizer=null"]
    code = main(fit_args(train_file, *missing, override))
    assert_refused(code, capsys.readouterr().err, expected)

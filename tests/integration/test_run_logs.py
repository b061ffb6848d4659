"""``smt fit`` logs by default: losses, lr, skipped steps, the selection's counts, table and heatmap.

The real CLI path on ``configs/debug.yaml`` (its ``logger: false`` overridden by ``--trainer.logger=true``,
what every other shipped config leaves unset) with the default logger forced to its CSV fallback, as on a
machine without TensorBoard; the TensorBoard side is checked on a stub logger (no TensorBoard dependency).
"""

import csv
from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG_CONFIG
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from smt.core.selection import Selection
from smt.kernels.blocks import BlockGrid
from smt.lightning import run_logs
from smt.lightning.callback import SparseMatrixTuning
from smt.lightning.cli import main
from smt.lightning.run_logs import SelectionReport, default_logger, selection_metrics, selection_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ("self_attn.q_proj", "self_attn.v_proj")  # configs/debug.yaml targets, 4 blocks of 16×16 in all


@pytest.fixture(scope="module")
def logged_fit(tmp_path_factory, train_file):
    """``smt fit --config configs/debug.yaml --trainer.logger=true`` without TensorBoard, in a fresh folder."""
    root = tmp_path_factory.mktemp("logged_fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(run_logs, "tensorboard_available", lambda: False)
        code = main(["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file),
                     "--trainer.logger=true", "--trainer.enable_checkpointing=false"])  # fmt: skip
    (log_dir,) = (root / "runs" / "debug" / "lightning_logs").iterdir()
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    return SimpleNamespace(code=code, log_dir=log_dir, rows=rows)


def column(rows: list[dict], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def test_default_logger_writes_losses_lr_and_skipped_steps_to_csv(logged_fit):
    assert logged_fit.code == 0
    assert logged_fit.log_dir.name == "version_0"
    assert len(column(logged_fit.rows, "train/loss")) == 8 and len(column(logged_fit.rows, "val/loss")) == 2
    learning_rates = column(logged_fit.rows, "lr-AdamW")
    assert len(learning_rates) == 8 and max(learning_rates) > 0
    assert column(logged_fit.rows, "smt/skipped_steps") == [0.0] * 8


def test_selection_counts_are_logged_once_at_the_selection_step(logged_fit):
    (row,) = [row for row in logged_fit.rows if row.get("smt/tuned_weights")]
    assert int(row["step"]) == 3  # the 3 warm-up steps are done
    assert float(row["smt/tuned_weights"]) == float(row["smt/trainable_params"]) == 4 * 16 * 16
    assert sum(float(row[f"smt/blocks/{kind}"]) for kind in KINDS) == 4


def test_selection_table_and_heatmap_lie_beside_the_metrics(logged_fit):
    assert (logged_fit.log_dir / "selection.png").read_bytes()[:8] == PNG_MAGIC
    table = list(csv.DictReader((logged_fit.log_dir / "selection.csv").open()))
    assert len(table) == 4 and {row["kind"] for row in table} == set(KINDS)  # 2 layers × q, v
    assert sum(int(row["blocks"]) for row in table) == 4 and {row["pool"] for row in table} == {"all"}


def test_default_logger_falls_back_to_csv_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logs, "tensorboard_available", lambda: False)
    logger = default_logger(tmp_path)
    assert isinstance(logger, CSVLogger) and logger.save_dir == str(tmp_path)


@pytest.mark.skipif(not run_logs.tensorboard_available(), reason="TensorBoard is not installed (not a dependency)")
def test_default_logger_is_tensorboard_when_installed(tmp_path):
    assert isinstance(default_logger(tmp_path), TensorBoardLogger)


def test_pools_get_their_own_block_counts():
    grids = {f"layers.{i}.{kind}": BlockGrid(32, 32, 16, 16) for i in range(2) for kind in ("attn.q", "mlp.up")}
    blocks = {"layers.0.attn.q": torch.tensor([[0, 0], [1, 1]]), "layers.1.mlp.up": torch.tensor([[0, 1]])}
    rows = selection_table(Selection(blocks, grids), {"attention": ".*attn.*", "mlp": ".*mlp.*"})
    metrics = selection_metrics(rows, trainable=3 * 256)
    assert metrics["smt/pool_blocks/attention"] == 2 and metrics["smt/pool_blocks/mlp"] == 1
    assert metrics["smt/blocks/attn.q"] == 2 and metrics["smt/tuned_weights"] == 3 * 256


class RecordingWriter:
    """The two ``SummaryWriter`` methods the report calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_figure(self, tag, figure, global_step=None, close=True) -> None:
        self.calls.append(("figure", tag, global_step, len(figure.axes)))

    def add_text(self, tag, text, global_step=None) -> None:
        self.calls.append(("text", tag, global_step, text))


def test_tensorboard_gets_the_heatmap_as_an_image_and_the_table_as_text(tmp_path):
    writer = RecordingWriter()
    logger = SimpleNamespace(experiment=writer, log_metrics=lambda values, step: writer.calls.append(("scalars", step)))
    grids = {f"model.layers.{i}.self_attn.v_proj": BlockGrid(32, 32, 16, 16) for i in range(2)}
    selection = Selection({"model.layers.1.self_attn.v_proj": torch.tensor([[1, 0]])}, grids)
    tuner = SparseMatrixTuning(target_modules=["v_proj"], block_size=16, num_blocks=1)
    tuner.selection = selection
    trainer = SimpleNamespace(loggers=[logger], global_step=5)
    tuner.target = lambda module: torch.nn.Linear(2, 2)
    SelectionReport().report(trainer, tuner, None, tmp_path)
    assert [call[0] for call in writer.calls] == ["scalars", "figure", "text"]
    assert writer.calls[1][1:] == ("smt/selection_heatmap", 5, 1)  # one panel: v_proj
    assert "model.layers.1.self_attn.v_proj" in writer.calls[2][3]  # the table lists the module with a block
    assert (tmp_path / "selection.png").read_bytes()[:8] == PNG_MAGIC


def test_logger_false_adds_no_logging_callbacks(train_file):
    from smt.lightning.cli import run_lightning

    cli = run_lightning(["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file),
                         "--trainer.max_steps=4", "--trainer.limit_val_batches=0"])  # fmt: skip
    assert cli.trainer.loggers == []
    assert not any(isinstance(cb, (SelectionReport, LearningRateMonitor)) for cb in cli.trainer.callbacks)


def test_pools_written_against_the_lightning_modules_names_are_reported(tmp_path):
    """Pool regexes match the LightningModule's names (``net\\.up``); the bank's names are the network's (``up``):
    the report groups by the patterns the callback turned into the network's names, not the ones written."""
    from lightning.pytorch import Trainer
    from plain_modules import QUIET, Regressor

    pools = {"first": {"pattern": r"net\.up", "num_blocks": 1}, "second": {"pattern": r"net\.down", "num_blocks": 1}}
    tuner = SparseMatrixTuning(target_modules=["up", "down"], block_size=4, warmup_steps=2, pools=pools)
    logger = CSVLogger(tmp_path)
    Trainer(max_steps=3, callbacks=[tuner, SelectionReport()], **(QUIET | {"logger": logger})).fit(Regressor())
    table = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "selection.csv").open()))
    assert {row["module"]: row["pool"] for row in table} == {"up": "first", "down": "second"}

"""What ``smt fit`` logs besides the losses, and where: the default logger and the selection report.

- :func:`default_logger`: TensorBoard when ``tensorboard`` (or ``tensorboardX``) is installed, else CSV, in
  Lightning's layout ``<default_root_dir>/lightning_logs/version_N``: Lightning's own default for
  ``logger=True``, chosen here so the fallback says one line instead of a paragraph (and tests can pick it).
- :class:`SelectionReport`: at the step the SMT callback makes (or loads) its selection, once:
  scalars ``smt/tuned_weights``, ``smt/trainable_params``, ``smt/blocks/<kind>`` (blocks of one module kind over
  all layers, e.g. ``smt/blocks/self_attn.v_proj``) and, with ``smt.pools``, ``smt/pool_blocks/<pool>``; the
  per-module table ``selection.csv`` and the heatmap ``selection.png`` in the run's log folder; on TensorBoard
  also the heatmap as an image (``add_figure``) and the table as text.

The other columns come from where they are made: ``train/loss`` and ``val/*`` (the LightningModule), ``lr-*``
(Lightning's ``LearningRateMonitor``, which ``smt fit`` adds whenever a logger is on), ``smt/skipped_steps``
(``NonFiniteGuard``), ``smt/warmup_left`` and ``smt/regrowth_swapped`` (``SparseMatrixTuning``).
"""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from smt.core.heatmap import module_kind
from smt.core.selection import Selection, assign_pools
from smt.lightning.callback import find_callback

TABLE_COLUMNS = ("module", "pool", "layer", "kind", "grid", "blocks", "tuned_weights")


def tensorboard_available() -> bool:
    """Whether Lightning's ``TensorBoardLogger`` can write (it uses ``tensorboard`` or else ``tensorboardX``)."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def default_logger(root_dir: str | Path) -> Logger:
    """The logger ``smt fit`` uses when the config leaves ``trainer.logger`` unset (or ``true``).

    Args:
        root_dir: the run's ``trainer.default_root_dir``; logs go to ``<root_dir>/lightning_logs/version_N``.

    Returns:
        A ``TensorBoardLogger`` when TensorBoard is installed, else a ``CSVLogger`` (``metrics.csv``).
    """
    if tensorboard_available():
        return TensorBoardLogger(save_dir=str(root_dir))
    rank_zero_info("smt: logging to CSV (metrics.csv); `pip install tensorboard` to log to TensorBoard instead")
    return CSVLogger(save_dir=str(root_dir))


def selection_table(selection: Selection, pools: dict[str, str] | None = None) -> list[dict]:
    """One row per targeted module: pool, layer, kind, block grid, blocks chosen and tuned weights.

    Args:
        selection: the selection to describe.
        pools: pool name → regex of its modules (``smt.pools``); unset: every module is in pool ``all``.
    """
    names = list(selection.grids)
    members = assign_pools(names, pools) if pools else {"all": names}
    pool_of = {name: pool for pool, modules in members.items() for name in modules}
    rows = []
    for name, grid in selection.grids.items():
        index = selection.blocks.get(name)
        kind, layer = module_kind(name)
        blocks = 0 if index is None else int(index.shape[0])
        tuned = 0 if index is None else grid.numel_of(index)
        rows.append({"module": name, "pool": pool_of[name], "layer": layer, "kind": kind,
                     "grid": f"{grid.shape[0]}x{grid.shape[1]}", "blocks": blocks, "tuned_weights": tuned})  # fmt: skip
    return rows


def selection_metrics(rows: list[dict], trainable: int) -> dict[str, float]:
    """Scalars of a selection table: tuned weights, trainable parameters, blocks per module kind and per pool."""
    kinds, pools = Counter(), Counter()
    for row in rows:
        kinds[row["kind"]] += row["blocks"]
        pools[row["pool"]] += row["blocks"]
    metrics = {"smt/tuned_weights": float(sum(r["tuned_weights"] for r in rows)), "smt/trainable_params": trainable}
    metrics.update({f"smt/blocks/{kind}": float(count) for kind, count in sorted(kinds.items())})
    if len(pools) > 1 or "all" not in pools:
        metrics.update({f"smt/pool_blocks/{pool}": float(count) for pool, count in sorted(pools.items())})
    return metrics


def markdown_table(rows: list[dict]) -> str:
    """The selection table as Markdown (TensorBoard's text panel renders it), modules with blocks only."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in TABLE_COLUMNS) + " |" for row in rows if row["blocks"]]
    return "\n".join(lines)


class SelectionReport(Callback):
    """Log the SMT selection once it exists: counts as scalars, a per-module table and the heatmap.

    ``smt fit`` adds it whenever a logger is on; in your own ``Trainer`` put it beside the SMT callback.

    Example:
        >>> trainer = Trainer(logger=CSVLogger("runs"), callbacks=[SparseMatrixTuning(density=0.01), SelectionReport()])
    """

    def __init__(self) -> None:
        self._reported: Selection | None = None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        tuner = find_callback(trainer)
        if tuner is None or tuner.selection is None or tuner.selection is self._reported or not trainer.loggers:
            return
        self._reported = tuner.selection
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            self.report(trainer, tuner, pl_module, folder)

    def report(self, trainer: Trainer, tuner, pl_module: LightningModule, folder: Path) -> None:
        """Write the scalars to every logger, the table and heatmap files to ``folder``, figures to TensorBoard."""
        from smt.core.heatmap import selection_figure
        from smt.core.summary import trainable_summary

        selection, step = tuner.selection, trainer.global_step
        pools = {name: pool.pattern for name, pool in (tuner.network_config.pools or {}).items()}  # as selection names
        rows = selection_table(selection, pools)
        metrics = selection_metrics(rows, trainable_summary(tuner.target(pl_module)).trainable)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "selection.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        figure = selection_figure(selection)
        figure.savefig(folder / "selection.png", dpi=110)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard (SummaryWriter); others get the files above
                experiment.add_figure("smt/selection_heatmap", figure, global_step=step, close=False)
                experiment.add_text("smt/selection", f"{selection.summary()}\n\n{markdown_table(rows)}", step)
        import matplotlib.pyplot as plt

        plt.close(figure)
        rank_zero_info(f"smt: selection report (table, heatmap) written to {folder}")

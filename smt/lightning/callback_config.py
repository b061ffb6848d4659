"""``CallbackConfig``: what ``SparseMatrixTuning`` is built from — every ``SMTConfig`` field, plus the settings that
only a run in a Trainer has (a saved selection to reuse, where the bank goes, regrowth, the progress check).

Each field is declared once: the callback takes these fields as its keyword arguments, so ``--smt.<field>`` in
``smt fit``, ``init_args`` in ``callbacks/smt.yaml`` and ``SparseMatrixTuning(<field>=…)`` in Python all reach this
class, and its field docstrings are what ``--help`` shows. A field added to ``SMTConfig`` arrives here (and on the
command line) with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass

from smt.core.config import RegrowthConfig, SMTConfig
from smt.core.scoring import get_criterion, gradient_free_criteria


@dataclass
class CallbackConfig(SMTConfig):
    """``SMTConfig`` and the settings of a run in a Trainer; checked in full before any model loads."""

    selection_path: str | None = None
    """Load this saved selection (or a delta file's selection) and skip the warm-up."""
    save_selection: str | None = None
    """Write the selection here when it is made (plus a heatmap PNG beside it)."""
    trainable_modules: str | list[str] | None = None
    """Further modules (or parameters) trained densely beside the blocks (a new head, norms): name suffixes
    (``[classifier]``) or one regex matched against the whole name, names as in the LightningModule's
    ``named_modules()``/``named_parameters()`` (``model.lm_head``, ``head.bias``)."""
    submodule: str | None = None
    """Attribute path of the network that gets the bank inside the LightningModule. Default: the module's
    ``smt_target()`` if it defines one, else the attribute that holds every target (``self.model`` → ``"model"``, so
    ``merge_delta(module.model)`` and delta files use the network's own names), else the LightningModule itself."""
    stop_after_selection: bool = False
    """End ``fit`` as soon as the selection is made (what ``smt select`` does)."""
    regrowth: RegrowthConfig | None = None
    """SpIEL-style prune-and-regrow of blocks during tuning (off when unset)."""
    regrowth_heatmaps: str | None = None
    """Folder for a selection heatmap after every regrowth event (off when unset)."""
    lr_scale: float = 1.0
    """The blocks' learning rate as a multiple of the optimizer's: their param group gets ``lr × lr_scale`` while a
    trained head or norms keep ``lr`` (LoRA+-style). 1 keeps the optimizer's LR; docs/quality.md ("learning rate")
    has the measured sweeps. In a LightningModule of your own, any other value needs the optimizer built from
    ``smt.lightning.param_groups.param_groups(self.trainer, params, lr)``."""
    check_progress_after: int = 10
    """Stop with an error when Δ is still exactly 0 in every slot after this many tuning optimizer steps with
    lr > 0 (a run that trains nothing); a shorter run is checked at its end. 0 = off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.regrowth, dict):
            self.regrowth = RegrowthConfig(**self.regrowth)
        if self.warmup_steps == 0 and self.selection_path is None and get_criterion(self.criterion).needs_gradients:
            raise ValueError(
                f"smt.warmup_steps=0 needs a selection_path or a gradient-free criterion {gradient_free_criteria()}; "
                f"criterion {self.criterion!r} scores gradients"
            )
        if not self.lr_scale > 0:
            raise ValueError(f"smt.lr_scale={self.lr_scale} must be > 0 (1 = the optimizer's LR)")
        if self.warmup_updates == "full" and self.selection_path is not None:
            raise ValueError(
                "smt.warmup_updates=full trains during the warm-up, which smt.selection_path skips; unset one of them"
            )

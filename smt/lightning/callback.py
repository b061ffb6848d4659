"""``SparseMatrixTuning``: the Lightning callback that runs warm-up → selection → block tuning.

Lifecycle (hook order verified against lightning 2.6 ``Trainer._run``: ``setup`` → ``configure_model``
→ checkpoint restore → ``strategy.setup`` (wrapping, ``configure_optimizers``) → ``on_fit_start`` →
``on_train_start``):

- ``setup``: freeze, wrap the targets and add the bank of K slots *before* the strategy wraps the model
  and before the optimizer is built, so the trainable set never changes afterwards. If the module
  builds its layers in ``configure_model``, injection runs right after it instead.
- warm-up = the first ``warmup_steps`` optimizer steps of ordinary training: the layers tap block
  scores; in ``on_before_optimizer_step`` every gradient is dropped (Lightning clips and steps after
  this hook), so nothing is updated and no optimizer state is made.
- at the last warm-up step: scores are summed across ranks, blocks selected, the selection's hash
  compared across ranks, the slots pointed at the blocks, their optimizer state cleared, tuning on.
- state: the map and phase are module buffers/extra state (restored with the weights); the warm-up's
  step count and partial scores are this callback's ``state_dict``, so resume never repeats a warm-up.
- one host sync per step: "were the taps finite?" and "did a slot move?" join the guard's and the pre-emption's
  flags in one vector, reduced over ranks once per optimizer step (``smt.lightning.step_flags``).
- no silent no-op (``smt.core.progress``): all-zero warm-up scores stop at selection; Δ still 0 in every slot after
  ``check_progress_after`` tuning steps with lr > 0 stops the run. The slots are looked at after that step (before
  regrowth); the decision joins the next step's flags, or is made before that step's checkpoint is written, or at
  the end. The count is in the ``state_dict``, so it survives resume.

The LR schedule should start after the warm-up: ``SMTLanguageModel`` does this itself; in your own
module wrap the step-wise lambda with ``smt.lightning.schedules.after_warmup`` (see ``warmup_offset``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from smt.adapters.delta import read_selection
from smt.core.config import PoolConfig, RegrowthConfig, SMTConfig
from smt.core.model import (
    apply_selection,
    current_selection,
    get_bank,
    inject,
    select_blocks,
    start_scoring,
    stop_scoring,
)
from smt.core.placement import (
    config_for_holder,
    holding_attribute,
    holding_attribute_of,
    train_densely,
)
from smt.core.progress import (
    ProgressCheck,
    check_gradients_reached,
    check_warmup_fits,
    slots_learning_rate_positive,
)
from smt.core.regrowth import Regrower, describe_event
from smt.core.scoring import CRITERIA, check_accumulator_memory
from smt.core.selection import Selection
from smt.core.summary import trainable_summary
from smt.lightning.distributed import (
    builds_layers_in_configure_model,
    check_same_selection,
    check_sharded_bank,
    check_strategy,
    run_after_configure_model,
    shards_in_configure_model,
    state_for_rank,
    sum_over_ranks,
)
from smt.lightning.guards import drop_gradients, loss_scale
from smt.lightning.step_flags import step_flags

GRADIENT_FREE = tuple(name for name, c in CRITERIA.items() if not c.needs_gradients)


class SparseMatrixTuning(Callback):
    """Train only the most important weight blocks of a LightningModule.

    Example:
        >>> trainer = Trainer(callbacks=[SparseMatrixTuning(target_modules=["v_proj"], density=0.01, warmup_steps=50)])

    Args:
        target_modules: modules whose weights get blocks: name suffixes (``["q_proj", "v_proj"]``) or one regex
            matched against the **whole** module name (``.*self_attn\\.(q|v)_proj``, PEFT's convention). Every
            pattern below follows the same rule; one that matches nothing is refused with a real name as example.
        block_size: block shape ``(rows, cols)`` or one int; ``-1`` = full dimension (strips). Larger = faster, coarser.
        num_blocks: total blocks to tune (set this or ``density``).
        density: fraction of targeted weights to tune (default 0.01 when neither budget is set).
        pools: separate budgets per named pool of modules, e.g.
            ``{"attention": {"pattern": ".*attn.*", "density": 0.01}}``.
        max_blocks_per_module: upper limit of blocks in one module.
        min_blocks_per_module: lower limit of blocks in every module.
        warmup_steps: optimizer steps of scoring before selection (nothing is updated during them).
        criterion: block score: ``grad_sq``, ``grad_mean_abs``, ``grad_abs_mean``, ``grad_l1``, ``grad_snr``,
            ``grad_sq_xnorm``, ``weight_abs_mean``, ``random`` (see ``smt.core.scoring``).
        accumulator_device: where ``grad_abs_mean`` keeps its weight-sized accumulators (``cpu`` to offload).
        forward: ``auto``, ``materialize`` (one dense GEMM) or ``additive`` (base(x) + block matmul).
        kernel: ``auto``, ``torch`` or ``triton``.
        delta_dtype: dtype of the trainable slots (``float32`` master weights by default).
        seed: seed of the ``random`` criterion.
        selection_path: load this saved selection (or delta's selection) and skip the warm-up.
        save_selection: write the selection here when it is made (plus a heatmap PNG beside it).
        trainable_modules: further modules (or parameters) trained densely beside the blocks (a new head, norms): name
            suffixes (``["classifier"]``) or one regex matched against the whole name, names as in the
            LightningModule's ``named_modules()``/``named_parameters()`` (``model.lm_head``, ``head.bias``).
        submodule: attribute path of the network that gets the bank inside the LightningModule. Default: the module's
            ``smt_target()`` if it defines one, else the attribute that holds every target (``self.model`` →
            ``"model"``, so ``merge_delta(module.model)`` and delta files use the network's own names), else the
            LightningModule itself (see ``smt.core.placement``).
        stop_after_selection: end ``fit`` as soon as the selection is made (what ``smt select`` does).
        regrowth: SpIEL-style prune-and-regrow of blocks during tuning (off when unset).
        regrowth_heatmaps: folder for a selection heatmap after every regrowth event (off when unset).
        check_progress_after: stop with an error when Δ is still exactly 0 in every slot after this many tuning
            optimizer steps with lr > 0 (a run that trains nothing); a shorter run is checked at its end. 0 = off.
    """

    def __init__(
        self,
        target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj"),
        block_size: int | tuple[int, int] = 256,
        num_blocks: int | None = None,
        density: float | None = None,
        pools: dict[str, PoolConfig] | None = None,
        max_blocks_per_module: int | None = None,
        min_blocks_per_module: int = 0,
        warmup_steps: int = 100,
        criterion: str = "grad_sq",
        accumulator_device: str | None = None,
        forward: str = "auto",
        kernel: str = "auto",
        delta_dtype: str = "float32",
        seed: int = 0,
        selection_path: str | None = None,
        save_selection: str | None = None,
        trainable_modules: str | list[str] | None = None,
        submodule: str | None = None,
        stop_after_selection: bool = False,
        regrowth: RegrowthConfig | None = None,
        regrowth_heatmaps: str | None = None,
        check_progress_after: int = 10,
    ) -> None:
        self.config = SMTConfig(
            list(target_modules) if isinstance(target_modules, tuple) else target_modules,
            block_size, num_blocks, density, pools, max_blocks_per_module, min_blocks_per_module,
            warmup_steps, criterion, accumulator_device, forward, kernel, delta_dtype, seed,
        )  # fmt: skip
        if self.config.warmup_steps == 0 and selection_path is None and criterion not in GRADIENT_FREE:
            raise ValueError(
                f"smt.warmup_steps=0 needs a selection_path or a gradient-free criterion {GRADIENT_FREE}; "
                f"criterion {criterion!r} scores gradients"
            )
        self.selection_path, self.save_selection = selection_path, save_selection
        self.trainable_modules, self.submodule = trainable_modules, submodule
        self.stop_after_selection = stop_after_selection
        self.regrowth_config, self.regrowth_heatmaps = regrowth, regrowth_heatmaps
        self.regrower: Regrower | None = None
        self._network_path: str | None = None  # the default holder's attribute, once found ("" = the module itself)
        self._network_config = self.config  # patterns as names relative to the network that gets the bank
        self.progress = ProgressCheck(check_progress_after)
        self.tuning_start = 0
        self._pending_regrowth: dict | None = None
        self._batch_key: tuple[int, int] | None = None
        self._last_counted: tuple[int, int] | None = None
        self.phase = "setup"
        self.steps_scored = 0
        self.selection: Selection | None = None
        self._scorers: dict = {}
        self._pending_state: dict | None = None
        self._rank = 0

    # --- where to inject ------------------------------------------------------------------------------

    def target(self, pl_module: LightningModule) -> torch.nn.Module:
        """The network that gets the bank: ``submodule``, ``smt_target()``, or the attribute holding every target."""
        if self.submodule:
            return pl_module.get_submodule(self.submodule)
        finder = getattr(pl_module, "smt_target", None)
        if callable(finder):
            return finder()
        if self._network_path is None:
            self._network_path = self._holding_attribute(pl_module)
        return pl_module.get_submodule(self._network_path)

    def _holding_attribute(self, pl_module: LightningModule) -> str:
        """Where the bank goes by default: the attribute holding the targets (or a saved selection's modules)."""
        if self.selection_path:  # the selection names the modules; target_modules are not used then
            return holding_attribute_of(pl_module, list(self._saved_selection.grids))
        path = holding_attribute(pl_module, self.config.target_modules)
        self._network_config = config_for_holder(self.config, pl_module, path)
        return path

    @cached_property
    def _saved_selection(self):
        """The selection at ``selection_path``, read once (placement and injection both need it)."""
        return read_selection(self.selection_path)

    @property
    def network_config(self) -> SMTConfig:
        """``config`` with its patterns as exact names in the network that holds the bank (what the selection names)."""
        return self._network_config

    @property
    def warmup_offset(self) -> int:
        """Optimizer steps before tuning starts (0 when a selection was loaded): where the LR schedule begins."""
        return 0 if self.selection_path else self.config.warmup_steps

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank  # before a checkpoint's state loads: only rank 0 keeps its summed scores
        flags = step_flags(trainer)
        flags.add(self._flag("taps"), lambda: self._taps_not_finite(pl_module))
        flags.add(self._flag("moved"), lambda: 0.0 if self.progress.pending is None else self.progress.pending)
        check_strategy(trainer.strategy, self.selection_path, self.regrowth_config)
        # Under FSDP2 the user's configure_model shards the network: the layers and the bank must exist before.
        if builds_layers_in_configure_model(pl_module) and not shards_in_configure_model(trainer.strategy):
            run_after_configure_model(pl_module, lambda: self._inject(trainer, pl_module, stage))
        else:
            self._inject(trainer, pl_module, stage)

    def _inject(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        network = self.target(pl_module)
        if get_bank(network) is None:
            self._add_bank(pl_module, network)
        if self.trainable_modules:
            train_densely(pl_module, self.trainable_modules, network)
        bank = get_bank(network)
        if stage == "fit" and not bank.tuning:
            if not (self.steps_scored or self._pending_state is not None):  # resuming: checked when the run began
                check_warmup_fits(self.config.warmup_steps, trainer.estimated_stepping_batches)
            self._scorers = start_scoring(network, self._network_config)
            home = self.config.accumulator_device or trainer.strategy.root_device
            check_accumulator_memory(list(self._scorers.values()), home)  # refuse before any step runs
            self.phase = "warmup"
            if self._pending_state is not None:
                self._load_scorers(self._pending_state)
        else:
            self.phase = "tuning" if bank.tuning else "warmup"
        rank_zero_info(f"smt: {trainable_summary(network)}")

    def _add_bank(self, pl_module: LightningModule, network: torch.nn.Module) -> None:
        """Freeze, wrap the targets and add the bank to ``network`` (from a saved selection when one is given)."""
        if self.selection_path:
            self.selection = self._saved_selection
            apply_selection(network, self.selection, self._network_config)
        else:
            inject(network, self._network_config)
        if self._network_path:  # the bank is on the holding attribute: freeze the rest of the LightningModule too
            slots = {id(slot) for slot in get_bank(network).slots}
            for param in pl_module.parameters():
                param.requires_grad_(id(param) in slots)

    # --- warm-up --------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under FSDP/DeepSpeed the callback state may load after on_fit_start: settle the phase here.
        bank = get_bank(self.target(pl_module))
        check_sharded_bank(self.target(pl_module), trainer.strategy)
        if bank.tuning and self.phase == "warmup":  # restored after selection
            stop_scoring(self.target(pl_module))
            self._scorers, self.phase = {}, "tuning"
        if self.phase == "warmup" and self.config.warmup_steps == 0:  # gradient-free criterion: choose now
            self._select(trainer, pl_module, tuning_start=trainer.global_step)
        if self.regrowth_config is not None and self.regrower is None:
            self.regrower = Regrower(self.regrowth_config, self._tuning_steps(trainer))
            if self._pending_regrowth is not None:
                self.regrower.load_state_dict(self._pending_regrowth, self.target(pl_module))
                self._pending_regrowth = None

    def _tuning_steps(self, trainer: Trainer) -> int:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return max(1, int(total) - self.warmup_offset)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.phase == "warmup":
            scale = loss_scale(trainer)
            for scorer in self._scorers.values():
                scorer.loss_scale = scale

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_key = (trainer.current_epoch, batch_idx)
        if self.phase == "tuning" and self.regrower is not None:
            coming = trainer.global_step - self.tuning_start + 1
            if self.regrower.in_window(coming):
                self.regrower.open_window(self.target(pl_module))

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._batch_key == self._last_counted:
            return  # a second optimizer on the same batch: this step is already counted
        self._last_counted = self._batch_key
        if self.progress.pending is not None:  # the check due at the last step, decided with this step's flags
            self.progress.check(self._totals(trainer)[self._flag("moved")] > 0)
        if self.phase == "tuning":
            if self.regrower is not None and self.regrower.scorers:
                self.regrower.commit_step(self._taps_finite(trainer))
            slots = get_bank(self.target(pl_module)).slots
            self.progress.count_step(slots_learning_rate_positive(trainer.optimizers, slots))
        if self.phase != "warmup":
            return
        # Lightning unscaled (and recorded GradScaler's inf check) before this hook, so None is safe under fp16.
        drop_gradients(optimizer)
        accept = self._taps_finite(trainer)
        for scorer in self._scorers.values():
            scorer.commit(accept)
        self.steps_scored += int(accept)
        if self.steps_scored >= self.config.warmup_steps:  # this step's optimizer step is still a warm-up one
            self._select(trainer, pl_module, tuning_start=trainer.global_step + 1)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        left = max(0, self.config.warmup_steps - self.steps_scored) if self.phase == "warmup" else 0
        pl_module.log("smt/warmup_left", float(left), prog_bar=True)
        if self.progress.due and self.progress.pending is None:  # before regrowth, which zeroes the slots it swaps
            self.progress.look(get_bank(self.target(pl_module)).slots)
        if self.phase == "tuning" and self.regrower is not None:
            self._maybe_regrow(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.progress.pending is None and self.progress.due_at_end:  # a run shorter than check_progress_after
            self.progress.look(get_bank(self.target(pl_module)).slots)
        self._decide_progress_now(trainer, pl_module)

    def _decide_progress_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Decide a pending progress check with its own reduction (at a checkpoint or the end: not a per-step cost)."""
        if self.progress.pending is not None:
            self.progress.check(float(_reduce_sum(trainer, self.progress.pending, pl_module)) > 0)

    # --- the step's flags ----------------------------------------------------------------------------

    def _flag(self, what: str) -> str:
        return f"smt {what} {id(self)}"

    def _totals(self, trainer: Trainer) -> dict[str, float]:
        return step_flags(trainer).totals(trainer, self._batch_key)

    def _taps_finite(self, trainer: Trainer) -> bool:
        """One decision per optimizer step, the same for every module and every rank: were all taps finite?"""
        return self._totals(trainer)[self._flag("taps")] == 0

    def _taps_not_finite(self, pl_module: LightningModule) -> torch.Tensor | float:
        """This rank's flag: 1.0 if a warm-up or regrowth-window tap of this step is not finite (no host sync)."""
        scorers = self._scorers if self.phase == "warmup" else self.regrower.scorers if self.regrower else {}
        pending = [scorer.pending for scorer in scorers.values() if scorer.pending is not None]
        finite = [torch.isfinite(tap).all().to(pl_module.device) for tap in pending]
        return (~torch.stack(finite).all()).float() if finite else 0.0

    def _maybe_regrow(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After an optimizer step that ends a regrowth interval: prune and regrow (shapes unchanged)."""
        step = trainer.global_step - self.tuning_start
        if step == self.regrower.step:
            return  # no optimizer step since the last call (gradient accumulation)
        self.regrower.step = step
        if not self.regrower.is_event(step):
            return
        network = self.target(pl_module)
        report = self.regrower.event(network, trainer.optimizers, lambda t: _reduce_sum(trainer, t, pl_module))
        pl_module.log("smt/regrowth_swapped", float(report["swapped"]))
        rank_zero_info(f"smt: regrowth at tuning step {step}: {describe_event(report)}")
        if self.regrowth_heatmaps and trainer.is_global_zero:
            current_selection(network).heatmap(Path(self.regrowth_heatmaps) / f"selection_step{step:06d}.png")

    def _select(self, trainer: Trainer, pl_module: LightningModule, tuning_start: int) -> None:
        network = self.target(pl_module)
        for scorer in self._scorers.values():
            scorer.reduce_(lambda t: _reduce_sum(trainer, t, pl_module))
        silent = check_gradients_reached(self._scorers, self.steps_scored)
        if silent:
            rank_zero_warn(f"smt: no gradient reached {len(silent)} targeted module(s) in the warm-up: {silent[:5]}")
        model_id = getattr(getattr(network, "config", None), "_name_or_path", None)
        selection = select_blocks(network, self._network_config, self._scorers, self.steps_scored, model_id)
        check_same_selection(selection.fingerprint(), lambda t: trainer.strategy.all_gather(t.to(pl_module.device)))
        apply_selection(network, selection)
        for slot in get_bank(network).slots:  # fresh optimizer state for every slot
            for opt in trainer.optimizers:
                opt.state.pop(slot, None)
        self.selection, self.phase, self._scorers = selection, "tuning", {}
        self.tuning_start = tuning_start
        rank_zero_info(f"smt: selected {selection.summary()}")
        rank_zero_info(f"smt: {trainable_summary(network)}")
        trainer.should_stop = trainer.should_stop or self.stop_after_selection
        if self.save_selection and trainer.is_global_zero:
            path = selection.save(self.save_selection)
            selection.heatmap(Path(path).with_suffix(".png"))
            rank_zero_info(f"smt: selection written to {path} (heatmap {Path(path).with_suffix('.png')})")

    # --- resume ---------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict:
        return {
            "phase": self.phase,
            "steps_scored": self.steps_scored,
            "scorers": {name: s.state_dict() for name, s in self._scorers.items()},
            "tuning_start": self.tuning_start,
            "regrowth": None if self.regrower is None else self.regrower.state_dict(),
            "progress": self.progress.state_dict(),
        }

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._decide_progress_now(trainer, pl_module)  # no checkpoint of a run that trains nothing is written
        # Each rank holds the scores of its own batches, but only rank 0's state is written: store their sum
        # (every rank runs this hook, so the collectives line up).
        if trainer.world_size > 1:
            reduce = lambda t: _reduce_sum(trainer, t, pl_module)  # noqa: E731
            sum_over_ranks(checkpoint["callbacks"][self.state_key], self._scorers, self.regrower, reduce)

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = state_for_rank(state_dict, self._rank)  # rank 0 resumes with the sum of all ranks, others 0
        self.steps_scored = int(state_dict["steps_scored"])
        self.tuning_start = int(state_dict.get("tuning_start", 0))
        self._pending_regrowth = state_dict.get("regrowth")
        self.progress.load_state_dict(state_dict.get("progress", {}))
        if state_dict["phase"] == "warmup":
            if self._scorers:
                self._load_scorers(state_dict)
            else:
                self._pending_state = state_dict

    def _load_scorers(self, state: dict) -> None:
        for name, scorer_state in state["scorers"].items():
            if name in self._scorers:
                self._scorers[name].load_state_dict(scorer_state)
        self._pending_state = None


def _reduce_sum(trainer: Trainer, tensor: torch.Tensor, pl_module: LightningModule) -> torch.Tensor:
    return trainer.strategy.reduce(tensor.to(pl_module.device), reduce_op="sum")

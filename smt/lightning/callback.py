"""``SparseMatrixTuning``: the Lightning callback that runs warm-up → selection → block tuning.

Lifecycle (hook order verified against lightning 2.6 ``Trainer._run``: ``setup`` → ``configure_model``
→ checkpoint restore → ``strategy.setup`` (wrapping, ``configure_optimizers``) → ``on_fit_start`` →
``on_train_start``):

- ``setup``: freeze, wrap the targets and add the bank of K slots *before* the strategy wraps the model
  and before the optimizer is built, so the trainable set never changes afterwards. If the module
  builds its layers in ``configure_model``, injection runs right after it instead.
- warm-up = the first ``warmup_steps`` optimizer steps of ordinary training: the layers tap block
  scores; in ``on_before_optimizer_step`` every gradient is dropped (Lightning clips and steps after
  this hook), so nothing is updated and no optimizer state is made. With ``warmup_updates=full`` only the slots'
  gradients are dropped and the network trains densely (``smt.lightning.full_warmup``).
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
from smt.core.config import SMTConfig
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
    holding_attribute_of,
    place,
    train_densely,
)
from smt.core.progress import (
    ProgressCheck,
    check_gradients_reached,
    check_warmup_fits,
    slots_learning_rate_positive,
)
from smt.core.regrowth import Regrower, describe_event
from smt.core.scoring import check_accumulator_memory
from smt.core.selection import Selection
from smt.core.summary import trainable_summary
from smt.lightning.callback_config import CallbackConfig
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
from smt.lightning.full_warmup import FullWarmup, check_full_warmup
from smt.lightning.guards import drop_gradients, loss_scale
from smt.lightning.param_groups import check_groups
from smt.lightning.step_flags import step_flags


class SparseMatrixTuning(Callback):
    """Train only the most important weight blocks of a LightningModule.

    Takes the fields of :class:`~smt.lightning.callback_config.CallbackConfig` (every ``SMTConfig`` field, plus
    ``selection_path``, ``save_selection``, ``trainable_modules``, ``submodule``, ``regrowth``, …) as its arguments;
    their docstrings there are what ``smt fit --help`` shows. Every check that needs no model runs here.

    Example:
        >>> trainer = Trainer(callbacks=[SparseMatrixTuning(target_modules=["v_proj"], density=0.01, warmup_steps=50)])
    """

    def __init__(self, *args, **settings) -> None:
        self.config = CallbackConfig(*args, **settings)
        self.progress = ProgressCheck(self.config.check_progress_after)
        full = self.config.warmup_updates == "full"
        self.full_warmup: FullWarmup | None = FullWarmup(self.config.warmup_lr) if full else None
        self.regrower: Regrower | None = None
        self._network_path: str | None = None  # the default holder's attribute, once found ("" = the module itself)
        self._network_config: SMTConfig = self.config  # patterns as names relative to the network that gets the bank
        self._targets: dict[str, torch.nn.Module] | None = None  # found once in the LightningModule, by holder name
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
        if self.config.submodule:
            return pl_module.get_submodule(self.config.submodule)
        finder = getattr(pl_module, "smt_target", None)
        if callable(finder):
            return finder()
        if self._network_path is None:
            self._network_path = self._holding_attribute(pl_module)
        return pl_module.get_submodule(self._network_path)

    def _holding_attribute(self, pl_module: LightningModule) -> str:
        """Where the bank goes by default: the attribute holding the targets (or a saved selection's modules)."""
        if self.config.selection_path:  # the selection names the modules; target_modules are not used then
            return holding_attribute_of(pl_module, list(self._saved_selection.grids))
        placement = place(pl_module, self.config)
        self._network_config, self._targets = placement.config, placement.targets
        return placement.attribute

    @cached_property
    def _saved_selection(self):
        """The selection at ``selection_path``, read once (placement and injection both need it)."""
        return read_selection(self.config.selection_path)

    @property
    def network_config(self) -> SMTConfig:
        """``config`` with its patterns as exact names in the network that holds the bank (what the selection names)."""
        return self._network_config

    @property
    def warmup_offset(self) -> int:
        """Optimizer steps before tuning starts (0 when a selection was loaded): where the LR schedule begins."""
        return 0 if self.config.selection_path else self.config.warmup_steps

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank  # before a checkpoint's state loads: only rank 0 keeps its summed scores
        flags = step_flags(trainer)
        flags.add(self._flag("taps"), lambda: self._taps_not_finite(pl_module))
        flags.add(self._flag("moved"), lambda: 0.0 if self.progress.pending is None else self.progress.pending)
        check_strategy(trainer.strategy, self.config.selection_path, self.config.regrowth)
        # Under FSDP2 the user's configure_model shards the network: the layers and the bank must exist before.
        if builds_layers_in_configure_model(pl_module) and not shards_in_configure_model(trainer.strategy):
            run_after_configure_model(pl_module, lambda: self._inject(trainer, pl_module, stage))
        else:
            self._inject(trainer, pl_module, stage)

    def _inject(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        network = self.target(pl_module)
        if get_bank(network) is None:
            self._add_bank(pl_module, network)
        if self.config.trainable_modules:
            train_densely(pl_module, self.config.trainable_modules, network)
        if self.full_warmup is not None and stage == "fit":
            check_full_warmup(trainer, pl_module, network)
            self.full_warmup.train(network)  # trainable before the strategy wraps, even when resumed after selection
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
        if self.config.selection_path:
            self.selection = self._saved_selection
            apply_selection(network, self.selection, self._network_config)
        else:
            inject(network, self._network_config, targets=self._targets)
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
        check_groups(self.config.lr_scale, trainer.optimizers)
        if self.full_warmup is not None:
            self.full_warmup.check_optimizer(trainer.optimizers)
            if self.phase == "tuning":  # resumed after selection: freeze and free what the checkpoint restored
                self.full_warmup.end(self.target(pl_module), trainer.optimizers)
        if self.phase == "warmup" and self.config.warmup_steps == 0:  # gradient-free criterion: choose now
            self._select(trainer, pl_module, tuning_start=trainer.global_step)
        if self.config.regrowth is not None and self.regrower is None:
            self.regrower = Regrower(self.config.regrowth, self._tuning_steps(trainer))
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
        if self.full_warmup is None:
            drop_gradients(optimizer)
        else:
            self.full_warmup.drop_slot_gradients(self.target(pl_module))
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
        if self.full_warmup is not None and self.phase == "tuning":  # after the last warm-up step's optimizer step
            self.full_warmup.end(self.target(pl_module), trainer.optimizers)
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
        if self.config.regrowth_heatmaps and trainer.is_global_zero:
            current_selection(network).heatmap(Path(self.config.regrowth_heatmaps) / f"selection_step{step:06d}.png")

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
        trainer.should_stop = trainer.should_stop or self.config.stop_after_selection
        if self.config.save_selection and trainer.is_global_zero:
            path = selection.save(self.config.save_selection)
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


def find_callback(trainer: Trainer) -> SparseMatrixTuning | None:
    """The trainer's ``SparseMatrixTuning`` callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, SparseMatrixTuning)), None)


def _reduce_sum(trainer: Trainer, tensor: torch.Tensor, pl_module: LightningModule) -> torch.Tensor:
    return trainer.strategy.reduce(tensor.to(pl_module.device), reduce_op="sum")

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
- no silent no-op (``smt.progress``): a warm-up whose gradient scores are all exactly 0 stops at selection;
  Δ still exactly 0 in every slot after ``check_progress_after`` tuning steps with lr > 0 stops the run
  (one flag reduced over ranks, at that one step; the count is in the ``state_dict``, so it survives resume).

The LR schedule should start after the warm-up: ``SMTLanguageModel`` does this itself; in your own
module wrap the step-wise lambda with ``smt.schedules.after_warmup`` (see ``warmup_offset``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from smt.core.config import PoolConfig, RegrowthConfig, SMTConfig
from smt.core.model import (
    BANK_NAME,
    apply_selection,
    current_selection,
    get_bank,
    inject,
    select_blocks,
    sparse_layers,
    start_scoring,
    stop_scoring,
    trainable_summary,
)
from smt.core.patterns import name_matcher, no_match_error
from smt.core.placement import (
    config_for_holder,
    holding_attribute,
    holding_attribute_of,
    relative_names,
    relative_selection,
    relocate_root_bank,
)
from smt.core.progress import (
    ProgressCheck,
    check_gradients_reached,
    local_slots_moved,
    slots_learning_rate_positive,
)
from smt.core.regrowth import Regrower
from smt.core.scoring import CRITERIA, check_accumulator_memory
from smt.core.selection import Selection
from smt.lightning.distributed import (
    check_same_selection,
    check_sharded_bank,
    check_strategy,
    shards_in_configure_model,
    summed_regrowth_state,
    summed_scorer_states,
    zeroed_regrowth_state,
    zeroed_scorer_states,
)
from smt.lightning.guards import drop_gradients, scaler_enabled

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
        criterion: block score: ``grad_sq``, ``grad_mean_abs``, ``grad_abs_mean``, ``grad_l1``, ``weight_abs_mean``,
            ``random`` (see ``smt.scoring``).
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
            LightningModule itself (see ``smt.placement``).
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
            return holding_attribute_of(pl_module, list(_load_selection(self.selection_path).grids))
        path = holding_attribute(pl_module, self.config.target_modules)
        self._network_config = config_for_holder(self.config, pl_module, path)
        return path

    @property
    def _moved_from_root(self) -> str:
        """The default holder's attribute, where runs before it existed kept the bank on the root ("" = none)."""
        return self._network_path or ""

    @property
    def warmup_offset(self) -> int:
        """Optimizer steps before tuning starts (0 when a selection was loaded): where the LR schedule begins."""
        return 0 if self.selection_path else self.config.warmup_steps

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank  # before a checkpoint's state loads: only rank 0 keeps its summed scores
        check_strategy(trainer.strategy, self.selection_path, self.regrowth_config)
        # Under FSDP2 the user's configure_model shards the network: the layers and the bank must exist before.
        if _has_configure_model(pl_module) and not shards_in_configure_model(trainer.strategy):
            _run_after_configure_model(pl_module, lambda: self._inject(trainer, pl_module, stage))
        else:
            self._inject(trainer, pl_module, stage)

    def _inject(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        network = self.target(pl_module)
        if get_bank(network) is None:
            self._add_bank(pl_module, network)
        self._unfreeze_trainable(pl_module)
        bank = get_bank(network)
        if stage == "fit" and not bank.tuning:
            self._check_warmup_fits(trainer)
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
            self.selection = relative_selection(_load_selection(self.selection_path), self._moved_from_root)
            apply_selection(network, self.selection, self._network_config)
        else:
            inject(network, self._network_config)
        if self._moved_from_root:  # the bank is on an attribute: freeze the rest of the LightningModule too
            slots = {id(slot) for slot in get_bank(network).slots}
            for param in pl_module.parameters():
                param.requires_grad_(id(param) in slots)
            # checkpoints of runs that kept the bank on the LightningModule itself load into the new place
            hook = partial(_relocate_root_bank_hook, prefix=self._moved_from_root)
            pl_module._register_load_state_dict_pre_hook(hook)

    def _check_warmup_fits(self, trainer: Trainer) -> None:
        """Refuse a warm-up that would use up the whole run (it would end with nothing tuned)."""
        if self.steps_scored or self._pending_state is not None:
            return  # resuming: the run's length was checked when it started
        total = trainer.estimated_stepping_batches
        if total != float("inf") and self.config.warmup_steps >= total:
            raise ValueError(
                f"smt.warmup_steps={self.config.warmup_steps} is not shorter than the run ({int(total)} optimizer "
                "steps); lower smt.warmup_steps or train longer (trainer.max_steps / max_epochs)"
            )

    def _unfreeze_trainable(self, pl_module: LightningModule) -> None:
        """Train the parameters named by ``trainable_modules`` (or owned by a module it names) densely."""
        if not self.trainable_modules:
            return
        matches = name_matcher(self.trainable_modules, "smt.trainable_modules")
        targeted = {id(layer.weight) for layer in sparse_layers(self.target(pl_module)).values()}
        hits = 0
        for name, param in pl_module.named_parameters():
            owner = name.rpartition(".")[0]
            if (matches(name) or matches(owner)) and id(param) not in targeted and BANK_NAME not in name:
                param.requires_grad_(True)
                hits += 1
        if hits == 0:
            owners = [n for n, m in pl_module.named_modules() if n and BANK_NAME not in n and _owns_parameters(m)]
            what = f"module or parameter of {type(pl_module).__name__} outside the targeted weights"
            raise no_match_error("smt.trainable_modules", self.trainable_modules, owners, what)

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
                state = self._pending_regrowth
                state = {**state, "scorers": relative_names(state["scorers"], self._moved_from_root),
                         "ema": relative_names(state["ema"], self._moved_from_root)}  # fmt: skip
                self.regrower.load_state_dict(state, self.target(pl_module))
                self._pending_regrowth = None

    def _tuning_steps(self, trainer: Trainer) -> int:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return max(1, int(total) - self.warmup_offset)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.phase == "warmup":
            scale = _loss_scale(trainer)
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
        if self.phase == "tuning":
            if self.regrower is not None and self.regrower.scorers:
                self.regrower.commit_step(_finite_everywhere(trainer, self.regrower.scorers.values(), pl_module))
            slots = get_bank(self.target(pl_module)).slots
            self.progress.count_step(slots_learning_rate_positive(trainer.optimizers, slots))
        if self.phase != "warmup":
            return
        # Lightning unscaled (and recorded GradScaler's inf check) before this hook, so None is safe under fp16.
        drop_gradients(optimizer)
        accept = _finite_everywhere(trainer, self._scorers.values(), pl_module)
        for scorer in self._scorers.values():
            scorer.commit(accept)
        self.steps_scored += int(accept)
        if self.steps_scored >= self.config.warmup_steps:  # this step's optimizer step is still a warm-up one
            self._select(trainer, pl_module, tuning_start=trainer.global_step + 1)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        left = max(0, self.config.warmup_steps - self.steps_scored) if self.phase == "warmup" else 0
        pl_module.log("smt/warmup_left", float(left), prog_bar=True)
        if self.progress.due:  # before regrowth, which zeroes the slots it swaps
            self._check_progress(trainer, pl_module)
        if self.phase == "tuning" and self.regrower is not None:
            self._maybe_regrow(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.progress.due_at_end:  # a run shorter than check_progress_after tuning steps
            self._check_progress(trainer, pl_module)

    def _check_progress(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Did any slot move? One flag summed over ranks: every rank stops together, before this step's checkpoint."""
        moved = local_slots_moved(get_bank(self.target(pl_module)).slots)
        self.progress.check(float(_reduce_sum(trainer, moved, pl_module)) > 0)

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
        dropped, grown = report["dropped_score"], report["grown_score"]
        pl_module.log("smt/regrowth_swapped", float(report["swapped"]))
        rank_zero_info(
            f"smt: regrowth at tuning step {step}: swapped {report['swapped']} blocks (rate {report['rate']:.3f}); "
            f"mean |Δ| dropped {_mean(dropped):.3g}, mean growth score of grown {_mean(grown):.3g}"
        )
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
        # Each rank holds the scores of its own batches, but only rank 0's state is written: store their sum
        # (every rank runs this hook, so the collectives line up).
        if trainer.world_size == 1:
            return
        state = checkpoint["callbacks"][self.state_key]
        reduce = lambda t: _reduce_sum(trainer, t, pl_module)  # noqa: E731
        state["scorers"] = summed_scorer_states(self._scorers, reduce)
        if self.regrower is not None:
            state["regrowth"] = summed_regrowth_state(self.regrower, reduce)
        state["summed_over_ranks"] = True

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("summed_over_ranks") and self._rank != 0:  # rank 0 resumes with the sum of all ranks
            state_dict = {**state_dict, "scorers": zeroed_scorer_states(state_dict["scorers"])}
            if state_dict.get("regrowth") is not None:
                state_dict["regrowth"] = zeroed_regrowth_state(state_dict["regrowth"])
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
        for name, scorer_state in relative_names(state["scorers"], self._moved_from_root).items():
            if name in self._scorers:
                self._scorers[name].load_state_dict(scorer_state)
        self._pending_state = None


def _relocate_root_bank_hook(state_dict: dict, *_, prefix: str) -> None:
    """A ``load_state_dict`` pre-hook (a module-level function, so a module holding it still pickles)."""
    relocate_root_bank(state_dict, prefix)


def _owns_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _reduce_sum(trainer: Trainer, tensor: torch.Tensor, pl_module: LightningModule) -> torch.Tensor:
    return trainer.strategy.reduce(tensor.to(pl_module.device), reduce_op="sum")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _load_selection(path: str) -> Selection:
    if str(path).endswith(".safetensors"):
        try:
            return Selection.load(path)
        except ValueError as err:
            if "not an smt selection file" not in str(err):
                raise
        from smt.adapters.delta import read_delta

        return read_delta(path)[0]
    return Selection.load(path)


def _has_configure_model(pl_module: LightningModule) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    # A module that builds its network in __init__ (SMTLanguageModel) only shards in configure_model: inject now.
    if getattr(pl_module, "smt_builds_network_in_init", False):
        return False
    return is_overridden("configure_model", pl_module)


def _run_after_configure_model(pl_module: LightningModule, then) -> None:
    """Patch ``configure_model`` on the instance so injection follows the user's layer building."""
    original = pl_module.configure_model

    def configure_model() -> None:  # no functools.wraps: Lightning's is_overridden must see an override
        original()
        then()
        pl_module.configure_model = original

    pl_module.configure_model = configure_model


def _finite_everywhere(trainer: Trainer, scorers, pl_module: LightningModule) -> bool:
    """One decision per optimizer step, the same for every module and every rank: were all taps finite?"""
    device = pl_module.device
    finite = [torch.isfinite(s.pending).all().to(device) for s in scorers if s.pending is not None]
    bad = (~torch.stack(finite).all()).float() if finite else torch.zeros((), device=device)
    return float(trainer.strategy.reduce(bad, reduce_op="sum")) == 0.0  # the step's one host sync


def _loss_scale(trainer: Trainer) -> float:
    return float(trainer.precision_plugin.scaler.get_scale()) if scaler_enabled(trainer) else 1.0

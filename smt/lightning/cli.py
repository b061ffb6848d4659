"""The ``smt`` command.

- ``smt --help``: every subcommand with one line; ``smt <command> --help``: that command's options.
- ``smt fit|validate|test|predict --config F [--smt.density 0.02 --trainer.max_steps 100 ...]``: LightningCLI
  with ``SMTLanguageModel``, ``InstructionDataModule`` and the ``SparseMatrixTuning`` callback as the
  top-level ``smt`` group (so ``--smt.*`` overrides work like ``--model.*``).
- ``smt select --config F --out sel.safetensors``: the warm-up only; writes the selection and its heatmap.
- ``smt export CKPT [--delta out.safetensors] [--merged DIR] [--peft DIR] [--lora RANK --lora_out DIR] [--dtype bf16]``:
  checkpoint → delta file / merged model / PEFT SHiRA adapter (exact) / PEFT LoRA adapter (rank-RANK SVD of Δ).
- ``smt merge BASE DELTA... (OUT | --out DIR) [--weights W...] [--allow_other_base]``: apply one or several
  deltas to a base model (weighted sum where blocks overlap); see ``docs/adapters.md``.

Errors a person can fix (bad paths, fields, budgets) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from types import MethodType

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smt.core.io import WriteFailedError
from smt.core.progress import NothingTrainedError
from smt.lightning.callback import SparseMatrixTuning
from smt.lightning.checkpoint_io import PreemptedError, PreemptionCheckpoint, with_atomic_checkpoint_io
from smt.lightning.datamodule import InstructionDataModule
from smt.lightning.distributed import release_process_group
from smt.lightning.guards import NonFiniteGuard, TrainingDivergedError
from smt.lightning.module import SMTLanguageModel
from smt.lightning.run_logs import SelectionReport, default_logger

COMMANDS = {
    "fit": "warm-up, select blocks, train them; writes checkpoints, the delta file and/or the merged model",
    "validate": "one pass over the validation set (loss, perplexity, token accuracy)",
    "test": "evaluate on the test sets (per-task accuracy; --ckpt_path to test a tuned checkpoint)",
    "predict": "run the model over the test prompts",
    "select": "the warm-up only: write the block selection (and its heatmap) to reuse with --smt.selection_path",
    "export": "checkpoint -> delta file, merged transformers model, PEFT SHiRA (exact) or LoRA (SVD) adapter",
    "merge": "apply one or several delta files to a base model and save_pretrained the result",
}
"""Every ``smt`` subcommand and its one-line summary (what ``smt --help`` prints)."""
USAGE_ERRORS = (ValueError, FileNotFoundError)
RUN_ERRORS = (TrainingDivergedError, WriteFailedError, NothingTrainedError)  # one line, exit 1: the run failed


class SMTCLI(LightningCLI):
    """LightningCLI with the SMT callback as a first-class ``smt`` argument group."""

    def add_core_arguments_to_parser(self, parser) -> None:
        """The ``smt`` and ``guard`` groups first: groups are instantiated in this order, so every check of the
        ``smt`` settings (``CallbackConfig``) runs before ``model`` loads a model."""
        parser.add_lightning_class_args(SparseMatrixTuning, "smt")
        parser.add_lightning_class_args(NonFiniteGuard, "guard")  # --guard.max_consecutive N (0 = only skip)
        super().add_core_arguments_to_parser(parser)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with atomic verified checkpoints (``smt.lightning.checkpoint_io``) unless given a CheckpointIO.

        An unset (or ``true``) ``trainer.logger`` becomes ``smt.lightning.run_logs.default_logger`` (TensorBoard,
        else CSV, under ``default_root_dir``); with any logger on, a ``LearningRateMonitor`` and the
        ``SelectionReport`` join the callbacks. ``logger: false`` turns all of it off.
        """
        config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.pop("plugins", config.get("plugins"))
        logger = kwargs.pop("logger", config.get("logger"))
        if logger is None or logger is True:
            logger = default_logger(config.get("default_root_dir") or os.getcwd())
        given = kwargs.pop("callbacks", config.get("callbacks")) or []
        callbacks = list(given) if isinstance(given, (list, tuple)) else [given]
        if logger:
            callbacks += [kind() for kind in (LearningRateMonitor, SelectionReport) if not _has(callbacks, kind)]
        return super().instantiate_trainer(
            **kwargs, plugins=with_atomic_checkpoint_io(plugins), logger=logger, callbacks=callbacks
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's ``--model.*`` values under ``--ckpt_path``.

        LightningCLI re-parses the checkpoint's hyper-parameters over the parsed config, which silently drops
        test-time choices (``--model.results_path``, ``eval_mode``, ``max_new_tokens``). The config given here
        already names the model; the checkpoint then loads its weights strictly, so a mismatch is an error,
        never a silent override.
        """

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.datamodule is not None and isinstance(self.model, SMTLanguageModel):
            self.datamodule.set_tokenizer(self.model.tokenizer)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Build ``--optimizer``/``--lr_scheduler`` when Lightning asks, not at parse time.

        LightningCLI instantiates them over ``model.parameters()`` before the callback's ``setup`` adds the
        bank, which would leave every trainable slot out of the optimizer.
        """
        super()._add_configure_optimizers_method_to_model(subcommand)
        optimizer_config = self._get(self.config, "optimizer")
        if not optimizer_config:
            return
        scheduler_config = self._get(self.config, "lr_scheduler")
        cli = self

        def configure_optimizers(model):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = instantiate_class(params, optimizer_config)
            scheduler = instantiate_class(optimizer, scheduler_config) if scheduler_config else None
            return cli.configure_optimizers(model, optimizer, scheduler)

        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)


def _has(callbacks: list, kind: type) -> bool:
    return any(isinstance(callback, kind) for callback in callbacks)


def run_lightning(args: list[str]) -> SMTCLI:
    """``smt fit|validate|test|predict ...`` (LightningCLI)."""
    # Handing LightningCLI the console's own argv (after routing select/export/merge) is this script's job,
    # not a mistake LightningCLI needs to warn about.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # CallbackConfig's field docstrings are --help
    return SMTCLI(
        SMTLanguageModel,
        InstructionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [PreemptionCheckpoint()]},
        parser_kwargs={"default_env": False},
    )


def run_select(args: list[str]) -> None:
    """``smt select --config F --out PATH [overrides]``: warm-up only, then write the selection."""
    parser = argparse.ArgumentParser(
        prog="smt select --config F",
        description="Run the warm-up only and save the selection (no block is trained).",
        epilog="Every option of `smt fit` is accepted too (`smt fit --help` lists them), e.g. --smt.density 0.02.",
    )
    parser.add_argument(
        "--out", required=True, help="selection file to write (.safetensors; a .png heatmap goes beside it)"
    )
    known, rest = parser.parse_known_args(args)
    run_lightning(
        ["fit", *rest, f"--smt.save_selection={known.out}", "--smt.stop_after_selection=true",
         "--smt.selection_path=null", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
         "--model.delta_path=null", "--model.merged_dir=null"]
    )  # fmt: skip


def command_help() -> str:
    """The text of ``smt --help``: every subcommand with one line, and where each one's options are."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join(
        ["usage: smt <command> [options]   (smt <command> --help lists a command's options)", "", "commands:", *lines]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help", "help"):
        print(command_help())
        return 0
    if not command.startswith("-") and command not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"smt: error: unknown command {command!r}; use one of {known} (smt --help)", file=sys.stderr)
        return 2
    try:
        if command == "select":
            run_select(argv[1:])
        elif command == "export":
            from smt.lightning.export import run_export

            run_export(argv[1:])
        elif command == "merge":
            from smt.lightning.export import run_merge

            run_merge(argv[1:])
        else:
            run_lightning(argv)
            release_process_group()
    except USAGE_ERRORS as err:
        print(f"smt: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except RUN_ERRORS as err:
        print(f"smt: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except PreemptedError as stop:
        print(f"smt: stopped by SIGTERM at step {stop.step}; resume with --ckpt_path {stop.path}", file=sys.stderr)
        return 143
    except SIGTERMException:  # Lightning's own stop (a SystemExit without a code: it would exit 0)
        print(
            "smt: stopped by SIGTERM before a checkpoint could be saved; resume from the last one, if any",
            file=sys.stderr,
        )
        return 143
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

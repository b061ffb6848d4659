"""``smt export`` (checkpoint → delta file and/or merged model) and ``smt merge`` (base + deltas → model).

A Lightning checkpoint of ``SMTLanguageModel`` holds the model's hyper-parameters and the bank (its
module names, block shapes and map live in the state dict), so export needs nothing else: the base is
rebuilt from the hyper-parameters, the bank re-created from the state dict, and the weights loaded
strictly. Checkpoints are read with ``torch.load(weights_only=True)``: no code runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from smt.delta import read_delta, save_delta
from smt.model import get_bank, inject_from_state, merge_delta


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded without executing code.

    Raises:
        ValueError: missing or unreadable file, or not a Lightning checkpoint of a model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or hostile files
        raise ValueError(
            f"checkpoint {path} cannot be read safely ({type(err).__name__}); is it a Lightning .ckpt?"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} has no state_dict; give a Lightning checkpoint (.ckpt)")
    return checkpoint


def model_from_checkpoint(path: str | Path):
    """Rebuild the ``SMTLanguageModel`` of a checkpoint with its bank, weights loaded strictly."""
    from smt.module import SMTLanguageModel

    checkpoint = load_checkpoint(path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if not hparams:
        raise ValueError(f"checkpoint {path} has no hyper_parameters; it was not written by SMTLanguageModel")
    module = SMTLanguageModel(**hparams)
    state = checkpoint["state_dict"]
    inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    inject_from_state(module.model, inner)
    module.on_load_checkpoint(checkpoint)  # a slim checkpoint gets the frozen base back from `model`
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def run_export(args: list[str]) -> None:
    """``smt export CKPT --delta OUT [--merged DIR] [--dtype bfloat16]``."""
    parser = argparse.ArgumentParser(
        prog="smt export", description="Write the delta file and/or merged model of a checkpoint."
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of `smt fit`")
    parser.add_argument("--delta", help="delta file to write (.safetensors)")
    parser.add_argument("--merged", help="folder for the merged transformers model (save_pretrained + tokenizer)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="delta storage dtype"
    )
    options = parser.parse_args(args)
    if not options.delta and not options.merged:
        raise ValueError("smt export needs --delta OUT and/or --merged DIR")
    module = model_from_checkpoint(options.checkpoint)
    if get_bank(module.model) is None or not get_bank(module.model).tuning:
        raise ValueError(f"checkpoint {options.checkpoint} was taken before the selection; nothing to export yet")
    if options.delta:
        print(f"delta written to {save_delta(module.model, options.delta, module.hparams.model, options.dtype)}")
    if options.merged:
        from smt.module import save_merged

        print(f"merged model written to {save_merged(module.model, module.tokenizer, options.merged)}")


def run_merge(args: list[str]) -> None:
    """``smt merge BASE DELTA... --out DIR [--weights W...]``: deltas applied to a base, saved with save_pretrained."""
    parser = argparse.ArgumentParser(prog="smt merge", description="Apply delta files to a base model and save it.")
    parser.add_argument("base", help="base model folder (save_pretrained layout)")
    parser.add_argument("deltas", nargs="+", help="delta files (.safetensors)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per delta (default 1 each)")
    options = parser.parse_args(args)
    weights = options.weights or [1.0] * len(options.deltas)
    if len(weights) != len(options.deltas):
        raise ValueError(f"--weights has {len(weights)} values for {len(options.deltas)} deltas; give one per delta")
    from smt.module import load_causal_lm, load_tokenizer_for

    model = load_causal_lm(options.base, None, "float32", "eager")
    for delta_path, weight in zip(options.deltas, weights):
        add_delta_(model, delta_path, weight)
    model.save_pretrained(options.out)
    load_tokenizer_for(options.base, None).save_pretrained(options.out)
    print(f"merged {len(options.deltas)} delta(s) into {options.out}")


@torch.no_grad()
def add_delta_(model: torch.nn.Module, path: str | Path, weight: float = 1.0) -> None:
    """``W += weight · Δ`` for every block of a delta file, on a plain model (validated before any write)."""
    from smt.model import check_selection_fits, logical_weight

    selection, deltas, _ = read_delta(path)
    check_selection_fits(model, selection)
    for name, index in selection.blocks.items():
        logical = logical_weight(model.get_submodule(name))
        grid = selection.grids[name]
        tiles = grid.gather(logical, index).float() + weight * deltas[name].float()
        grid.scatter_(logical, index, tiles)


__all__ = ["add_delta_", "load_checkpoint", "merge_delta", "model_from_checkpoint", "run_export", "run_merge"]

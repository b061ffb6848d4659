"""``smt export`` (checkpoint → delta file, merged model, SHiRA and/or LoRA adapter) and ``smt merge`` (deltas → model).

A Lightning checkpoint of ``SMTLanguageModel`` holds the model's hyper-parameters and the bank (its
module names, block shapes and map live in the state dict), so export needs nothing else: the base is
rebuilt from the hyper-parameters, the bank re-created from the state dict, and the weights loaded
strictly. Checkpoints are read with ``torch.load(weights_only=True)``: no code runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from smt.adapters.delta import save_delta
from smt.adapters.merge import fuse_deltas_, save_merged, save_requantized
from smt.core.model import DTYPES, get_bank, inject_from_state
from smt.core.progress import local_slots_moved, refuse_all_zero_delta


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, loaded without executing code.

    Raises:
        ValueError: missing or unreadable file, or not a Lightning checkpoint of a model.
    """
    from smt.lightning.checkpoint_io import read_checkpoint  # zip CRCs and record sizes verified first

    return read_checkpoint(path)


def model_from_checkpoint(path: str | Path):
    """Rebuild the ``SMTLanguageModel`` of a checkpoint with its bank, weights loaded strictly."""
    from smt.lightning.module import SMTLanguageModel

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


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run_export(args: list[str]) -> None:
    """``smt export CKPT [--delta OUT] [--merged DIR] [--peft DIR] [--lora RANK --lora_out DIR] [--dtype bfloat16]``."""
    options = _export_options(args)
    module = model_from_checkpoint(options.checkpoint)
    bank = get_bank(module.model)
    if bank is None or not bank.tuning:
        raise ValueError(f"checkpoint {options.checkpoint} was taken before the selection; nothing to export yet")
    refuse_all_zero_delta(bool(local_slots_moved(bank.slots)), f"export {options.checkpoint}")
    if options.delta:
        written = save_delta(module.model, options.delta, module.hparams.model, options.dtype, module.tokenizer)
        print(f"delta written to {written}")
    if options.peft:
        from smt.adapters.shira import export_shira

        report = export_shira(module.model, options.peft, module.hparams.model, DTYPES[options.dtype])
        print(f"PEFT SHiRA adapter written to {options.peft}: {report}")
    if options.lora is not None:
        _export_lora(module, options)
    if options.merged and options.requantize:
        _export_requantized(module, options.merged)
    elif options.merged:
        print(f"merged model written to {save_merged(module.model, module.tokenizer, options.merged)}")


def _export_parser() -> argparse.ArgumentParser:
    """The options of ``smt export`` (what ``smt export --help`` prints)."""
    parser = argparse.ArgumentParser(
        prog="smt export",
        description="Write the delta file, merged model, PEFT SHiRA adapter and/or LoRA adapter of a checkpoint.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of `smt fit`")
    parser.add_argument("--delta", help="delta file to write (.safetensors)")
    parser.add_argument("--merged", help="folder for the merged transformers model (save_pretrained + tokenizer)")
    parser.add_argument(
        "--peft",
        metavar="DIR",
        help="write Δ as a PEFT SHiRA adapter (exact, entry for entry; PeftModel.from_pretrained(base, DIR) loads it)",
    )
    parser.add_argument("--lora", type=int, metavar="RANK", help="also write Δ as a rank-RANK PEFT LoRA adapter (SVD)")
    parser.add_argument("--lora_out", help="folder for the LoRA adapter (with --lora)")
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="with --merged on a quantized base: re-quantize W0 + Δ to the base's format (error bound printed) "
        "instead of saving it dequantized in bf16",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=[*DTYPE_ALIASES.values(), *DTYPE_ALIASES],
        help="storage dtype of the delta file and adapter weights (fp32: the SHiRA adapter reproduces the tuned model)",
    )
    return parser


def _export_options(args: list[str]) -> argparse.Namespace:
    """``smt export``'s parsed options (``--dtype`` spelled out), refused in one line when they ask for nothing.

    Raises:
        ValueError: no output named, ``--lora`` without ``--lora_out`` (or the reverse), ``--requantize`` without
            ``--merged``, or a rank below 1.
    """
    options = _export_parser().parse_args(args)
    options.dtype = DTYPE_ALIASES.get(options.dtype, options.dtype)
    if not options.delta and not options.merged and not options.peft and options.lora is None:
        raise ValueError("smt export needs --delta OUT, --merged DIR, --peft DIR and/or --lora RANK --lora_out DIR")
    if (options.lora is None) != (options.lora_out is None):
        raise ValueError("smt export: give --lora RANK and --lora_out DIR together")
    if options.requantize and not options.merged:
        raise ValueError("smt export --requantize needs --merged DIR (the folder the re-quantized model goes to)")
    if options.lora is not None and options.lora < 1:
        raise ValueError(f"smt export --lora {options.lora}: the rank must be at least 1")
    return options


def _export_requantized(module, folder: str) -> None:
    """``quant(deq(Q) + Δ)`` saved in the base's format, with the re-quantization error of each layer printed."""
    report = save_requantized(module.model, folder)  # consumes the model: it runs last
    module.tokenizer.save_pretrained(folder)
    lines = [
        f"  {name}: max |error| {err:.3g} ({100 * rel:.2f} % of max |W|), max |Δ| {d:.3g}"
        for name, err, rel, d in report
    ]
    worst = max((err for _, err, _, _ in report), default=0.0)
    print(f"re-quantized merged model written to {folder}; max |W_requant − (W0 + Δ)| = {worst:.3g}", *lines, sep="\n")


def _export_lora(module, options) -> None:
    """The LoRA adapter of ``module``'s Δ, its error table printed (output error on 2×32 random tokens)."""
    from smt.adapters.lora import export_lora

    vocab = module.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    report = export_lora(module.model, options.lora_out, options.lora, module.hparams.model, DTYPES[options.dtype], ids)
    print(f"LoRA adapter (rank {options.lora}) written to {options.lora_out}\n{report.table()}")


def run_merge(args: list[str]) -> None:
    """``smt merge BASE DELTA... (--out DIR | OUT) [--weights W...]``: deltas on a base, saved with save_pretrained.

    Without ``--out`` the last positional argument is the output folder (``smt merge BASE DELTA... OUT``).
    """
    parser = argparse.ArgumentParser(prog="smt merge", description="Apply delta files to a base model and save it.")
    parser.add_argument("base", help="base model: a folder (save_pretrained layout) or a hub id")
    parser.add_argument("deltas", nargs="+", help="delta files (.safetensors), then OUT unless --out is given")
    parser.add_argument("--out", help="folder to write the merged model to (default: the last positional argument)")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per delta (default 1 each)")
    parser.add_argument("--allow_other_base", action="store_true", help="skip the base model id check (shapes still)")
    options = parser.parse_args(args)
    deltas, out = split_merge_targets(options.base, options.deltas, options.out)
    weights = options.weights or [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError(f"--weights has {len(weights)} values for {len(deltas)} deltas; give one per delta")
    from smt.lightning.module import load_causal_lm, load_tokenizer_for

    model = load_causal_lm(options.base, None, "float32", "eager")
    fuse_deltas_(model, deltas, weights, "" if options.allow_other_base else None)
    model.save_pretrained(out)
    load_tokenizer_for(options.base, None).save_pretrained(out)
    print(f"merged {len(deltas)} delta(s) into {out}")


def split_merge_targets(base: str, positionals: list[str], out: str | None) -> tuple[list[str], str]:
    """The delta files and the output folder of ``smt merge`` (``--out`` or the last positional).

    Raises:
        ValueError: no delta left, an output that is a file or a ``.safetensors`` name, or the base itself.
    """
    if out is None:
        if len(positionals) < 2:
            raise ValueError("smt merge needs BASE DELTA... OUT (or --out DIR); no output folder was given")
        positionals, out = positionals[:-1], positionals[-1]
    if out.endswith(".safetensors") or Path(out).is_file():
        raise ValueError(f"smt merge output {out!r} is a file, not a folder; put the output folder last or use --out")
    if Path(out).resolve() == Path(base).resolve():
        raise ValueError(f"smt merge output {out!r} is the base folder; write the merged model elsewhere")
    return positionals, out


__all__ = [
    "load_checkpoint",
    "model_from_checkpoint",
    "run_export",
    "run_merge",
    "split_merge_targets",
]

"""The end-to-end phase of ``scripts/gpu_check.py``: training steps of full FT, LoRA and SMT on one random Llama.

Every arm starts from the same seeded random init (weights do not matter for speed), trains in bf16-mixed
(fp32 weights and optimizer state, forward and backward under ``torch.autocast(bfloat16)``, as Lightning's
``bf16-mixed`` does) with ``smt.core.quant.build_optimizer("adamw")`` (what ``SMTLanguageModel`` uses), on
random token batches. The steps are a plain loop, not a ``Trainer``: per-step CUDA events, and no Trainer
start-up per arm inside a short device lease. The SMT arms run the library's own steps, as the README's
library example and the callback do: ``inject`` → ``start_scoring`` → warm-up steps (scores tapped, slot
gradients dropped before the optimizer step, as the callback drops them) → ``select_blocks`` →
``apply_selection`` → tuning steps.

- ``full``: every weight trains.
- ``lora``: peft LoRA of rank ``r`` on the target modules (alpha 2r, no dropout).
- ``smt <kernel> <b>²``: blocks of ``b × b`` on the same modules, as many as LoRA's trainable weights
  (``r·(out + in)`` per module, summed, over ``b²``), with ``smt.kernel`` ``torch`` or ``triton``.

Per arm: median step time over the measured steps (the first ``skip`` left out: compilation, allocator growth),
the median SMT warm-up step, and peak allocated memory (``torch.cuda.max_memory_allocated``, weights included)
over the measured steps and over the warm-up; off GPU wall time and no memory figure.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from gpu_check_kernels import Record, elapsed_ms

from smt.core.config import SMTConfig
from smt.core.model import apply_selection, find_targets, inject, linear_geometry, select_blocks, start_scoring
from smt.core.quant import build_optimizer


@dataclass(frozen=True)
class Arm:
    """One way of training: ``full``, ``lora`` or ``smt`` (with its kernel setting and square block edge)."""

    method: str
    kernel: str | None = None
    block: int | None = None

    @property
    def label(self) -> str:
        return f"smt {self.kernel} {self.block}²" if self.method == "smt" else self.method


@dataclass(frozen=True)
class TrainSizes:
    """The model, batch shapes, arms and step counts of the end-to-end phase."""

    model: dict
    shapes: tuple[tuple[int, int], ...]
    """``(sequence length, batch size)`` pairs."""
    arms: tuple[Arm, ...]
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    rank: int = 8
    smt_warmup: int = 3
    steps: int = 10
    skip: int = 2

    @classmethod
    def gpu(cls) -> TrainSizes:
        """A ~1.1B Llama (TinyLlama's widths, 8 KV heads); 4096 tokens per step either way."""
        model = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                     tie_word_embeddings=False)  # fmt: skip
        arms = (Arm("full"), Arm("lora"), Arm("smt", "torch", 256), Arm("smt", "triton", 256), Arm("smt", "triton", 64))
        return cls(model, ((512, 8), (2048, 2)), arms)

    @classmethod
    def dry_run(cls) -> TrainSizes:
        """A 2-layer Llama small enough for the Triton interpreter."""
        model = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                     tie_word_embeddings=False)  # fmt: skip
        arms = (Arm("full"), Arm("lora"), Arm("smt", "torch", 16), Arm("smt", "triton", 16), Arm("smt", "triton", 8))
        return cls(model, ((16, 4), (64, 1)), arms, rank=2, smt_warmup=1, steps=2, skip=1)


def build_model(sizes: TrainSizes, device: torch.device) -> torch.nn.Module:
    """The random Llama in fp32 on ``device``, in training mode (seed 0: every arm gets the same weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**sizes.model)
    config._attn_implementation = "sdpa"  # transformers 5 takes the attention kernel from the config
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: no host copy of 4 GB of fp32 weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def matched_blocks(model: torch.nn.Module, sizes: TrainSizes, block: int) -> int:
    """SMT's block count with as many weights as LoRA of ``sizes.rank``: ``round(Σ r·(out + in) / block²)``."""
    targets = find_targets(model, list(sizes.targets)).values()
    lora = sum(sizes.rank * sum(linear_geometry(module)[:2]) for module in targets)
    return max(1, round(lora / block**2))


def prepare_arm(model: torch.nn.Module, arm: Arm, sizes: TrainSizes):
    """Set up ``arm`` on ``model``: ``(model, trainable parameters, SMT config or None, scorers or None)``."""
    if arm.method == "full":
        return model, list(model.parameters()), None, None
    if arm.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(sizes.targets)
        model = get_peft_model(model, LoraConfig(r=sizes.rank, lora_alpha=2 * sizes.rank, lora_dropout=0.0,
                                                 target_modules=targets))  # fmt: skip
        return model, [p for p in model.parameters() if p.requires_grad], None, None
    config = SMTConfig(target_modules=list(sizes.targets), block_size=arm.block,
                       num_blocks=matched_blocks(model, sizes, arm.block), warmup_steps=sizes.smt_warmup,
                       criterion="grad_sq", kernel=arm.kernel)  # fmt: skip
    inject(model, config)
    scorers = start_scoring(model, config)
    return model, [p for p in model.parameters() if p.requires_grad], config, scorers


def training_step(model, batch: torch.Tensor, optimizer, scorers: dict | None = None) -> None:
    """One optimizer step in bf16-mixed; with ``scorers`` an SMT warm-up step (scores kept, nothing updated)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    if scorers is not None:
        for scorer in scorers.values():
            scorer.commit()
        for group in optimizer.param_groups:  # the callback drops the slots' warm-up gradients the same way
            for param in group["params"]:
                param.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure_arm(arm: Arm, sizes: TrainSizes, seq: int, batch_size: int, device: torch.device) -> dict:
    """Build, set up and train one arm: its step times, peaks and trainable count (its model dies with the call)."""
    _reset_peak(device)
    model, params, config, scorers = prepare_arm(build_model(sizes, device), arm, sizes)
    optimizer = build_optimizer("adamw", params, 1e-5, (0.9, 0.999), 0.0, device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, sizes.model["vocab_size"], (batch_size, seq), device=device, generator=generator)
    row = {"warmup_step_ms": None, "first_warmup_step_ms": None, "warmup_peak_gib": None}
    if scorers is not None:
        warm_step = partial(training_step, model, batch, optimizer, scorers)
        warm = [elapsed_ms(warm_step, device) for _ in range(sizes.smt_warmup)]
        row.update(warmup_step_ms=statistics.median(warm), first_warmup_step_ms=warm[0],
                   warmup_peak_gib=_peak_gib(device))  # fmt: skip
        apply_selection(model, select_blocks(model, config, scorers, warmup_steps=sizes.smt_warmup))
        _reset_peak(device)
    step = partial(training_step, model, batch, optimizer)
    times = [elapsed_ms(step, device) for _ in range(sizes.skip + sizes.steps)]
    return {**row, "step_ms": statistics.median(times[sizes.skip :]), "peak_gib": _peak_gib(device),
            "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(value: float | None, reference: dict | None, key: str) -> float | None:
    if value is None or reference is None or not reference.get(key):
        return None
    return value / reference[key]


def run_training(sizes: TrainSizes, device: torch.device, record: Record, deadline: Callable[[], float]) -> list[str]:
    """Every arm at every batch shape, one row each, until ``deadline()`` (seconds left) runs out.

    An out-of-memory arm is a result (row status ``OOM``); any other error is a row status and a problem line,
    and the next arm runs.

    Returns:
        One line per arm that failed or was skipped for time.
    """
    problems, slowest = [], 0.0
    for seq, batch_size in sizes.shapes:
        done: dict[str, dict] = {}
        for arm in sizes.arms:
            head = {"seq": seq, "batch": batch_size, "arm": arm.label, "method": arm.method, "kernel": arm.kernel,
                    "block": arm.block}  # fmt: skip
            if deadline() < 1.2 * slowest:
                problems.append(f"{arm.label} at {seq}×{batch_size}: skipped, the phase's time budget ran out")
                record("train", {**head, "status": "skipped (time)"})
                continue
            started = time.perf_counter()
            _release(device)  # the last arm's model, or what an error left behind
            try:
                row = {**head, "status": "ok", **measure_arm(arm, sizes, seq, batch_size, device)}
            except torch.OutOfMemoryError:
                row = {**head, "status": "OOM"}
            except Exception as err:  # one arm failing must not lose the others
                first = (str(err).strip().splitlines() or [""])[0][:200]
                row = {**head, "status": f"error: {type(err).__name__}: {first}"}
                problems.append(f"{arm.label} at {seq}×{batch_size}: {type(err).__name__}: {first}")
            row["arm_s"] = time.perf_counter() - started
            slowest = max(slowest, row["arm_s"])
            full, lora = done.get("full"), done.get("lora")
            row.update(step_of_lora=_ratio(row.get("step_ms"), lora, "step_ms"),
                       step_of_full=_ratio(row.get("step_ms"), full, "step_ms"),
                       peak_of_lora=_ratio(row.get("peak_gib"), lora, "peak_gib"),
                       peak_of_full=_ratio(row.get("peak_gib"), full, "peak_gib"))  # fmt: skip
            if row["status"] == "ok":
                done[arm.method if arm.method != "smt" else arm.label] = row
            record("train", row)
    return problems

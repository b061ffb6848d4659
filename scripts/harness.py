"""What the benchmark and study scripts share: tiny-model presets, the arm builder (SMT, SMT + regrowth, LoRA, full
fine-tuning from the same weights), the CPU Trainer they fit with, the step clock that times every step, and peak
memory (CUDA allocator or CPU resident set).

Scripts import it as a sibling (``from harness import …``): ``python scripts/<name>.py`` puts ``scripts/`` on the path.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from pathlib import Path

from lightning.pytorch import Callback, Trainer, seed_everything

TINY_LLAMAS = {
    "debug": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "medium": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
}
"""Random Llama shapes (GQA with 2 KV heads, byte-tokenizer vocabulary): ``debug`` is ``configs/debug.yaml``'s."""


def tiny_llama(preset: str = "small", **overrides) -> dict:
    """A transformers config dict (``SMTLanguageModel(model_config=…)``) of a random Llama of ``preset``'s shape."""
    return {"model_type": "llama", "num_key_value_heads": 2, "vocab_size": 384, **TINY_LLAMAS[preset], **overrides}


def language_model(model: str | None, model_config: dict | None, tokenizer: str | None, seed: int, **settings):
    """``SMTLanguageModel`` with sdpa attention and full (not slim) checkpoints, its weights drawn from ``seed``."""
    from smt.lightning.module import SMTLanguageModel

    seed_everything(seed, verbose=False)
    return SMTLanguageModel(model=model, model_config=model_config, tokenizer=tokenizer, attn_implementation="sdpa",
                            slim_checkpoints=False, **settings)  # fmt: skip


def arm_callbacks(module, kind: str, targets: list[str], rank: int, **smt_settings) -> list[Callback]:
    """Make ``module`` one arm of a comparison at LoRA rank ``rank``'s budget; the callbacks it trains with.

    Args:
        module: an ``SMTLanguageModel`` fresh from :func:`language_model`.
        kind: ``full`` (every weight), ``lora`` (PEFT LoRA of ``rank`` on ``targets``, alpha 2·rank), ``rslora``
            (the same, scaled by alpha/√rank instead of alpha/rank, so the update's size does not shrink as the rank
            grows) or ``smt`` (as many weights in blocks as that LoRA has: ``smt.budget_lora_rank``).
        targets: module-name suffixes both LoRA and SMT tune.
        rank: the LoRA rank, and so the budget.
        smt_settings: further ``SparseMatrixTuning`` settings (``block_size``, ``warmup_steps``, ``criterion``,
            ``regrowth``, …).
    """
    if kind == "full":
        return []
    if kind in ("lora", "rslora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                            use_rslora=kind == "rslora")  # fmt: skip
        module.model = get_peft_model(module.model, config)
        return []
    if kind != "smt":
        raise ValueError(f"arm kind {kind!r} is not one of full, lora, rslora, smt")
    from smt.lightning.callback import SparseMatrixTuning

    return [SparseMatrixTuning(target_modules=targets, budget_lora_rank=rank, **smt_settings)]


def cpu_trainer(steps: int, callbacks: list, precision: str = "32-true", **settings) -> Trainer:
    """A quiet Trainer: no logger, checkpoints, progress bar or sanity check; ``steps`` optimizer steps (-1: none,
    for ``validate``/``test``)."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 num_sanity_val_steps=0)  # fmt: skip
    return Trainer(max_steps=steps, devices=1, precision=precision, callbacks=callbacks, **{**quiet, **settings})


class StepClock(Callback):
    """Wall time and loss of every training step, and what the SMT callback was doing in it (warm-up, or a
    regrowth scoring window)."""

    def __init__(self, smt=None) -> None:
        self.smt = smt
        self.times: list[float] = []
        self.losses: list[float] = []
        self.warmup: list[bool] = []
        self.scoring: list[bool] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase = None if self.smt is None else self.smt.phase
        regrower = None if self.smt is None else self.smt.regrower  # SMT runs first: a due window is open already
        self.warmup.append(phase == "warmup")
        self.scoring.append(phase == "tuning" and regrower is not None and bool(regrower.scorers))
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))

    def median_update_step(self, skip: int = 0) -> float:
        """Median time of the steps that update weights, the first ``skip`` of them left out."""
        updating = [t for t, w in zip(self.times, self.warmup) if not w][skip:]
        return statistics.median(updating) if updating else float("nan")

    def warmup_share(self) -> float:
        """Warm-up time ÷ training time, from median step times: one-off costs (first-call imports, allocator
        growth) and a neighbour's burst would otherwise land on whichever steps they happened to hit."""
        warm = [t for t, w in zip(self.times, self.warmup) if w]
        if not warm:
            return 0.0
        updating = [t for t, w in zip(self.times, self.warmup) if not w]
        warm_s = len(warm) * statistics.median(warm)
        return warm_s / (warm_s + len(updating) * (statistics.median(updating) if updating else 0.0))

    def window_ratio(self) -> float:
        """Median step time in regrowth scoring windows ÷ other tuning steps of the same run (noise cancels)."""
        tuning = [(t, s) for t, s, w in zip(self.times, self.scoring, self.warmup) if not w]
        window = [t for t, s in tuning if s]
        plain = [t for t, s in tuning if not s]
        return statistics.median(window) / statistics.median(plain) if window and plain else float("nan")


class PeakMemory:
    """Peak memory above a baseline taken before the method's model exists (CUDA allocator or CPU RSS)."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = 0

    def start(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self.baseline = proc_status_kib("VmRSS") * 1024

    def peak_mb(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else proc_status_kib("VmHWM") * 1024
        return (peak - self.baseline) / 2**20


def proc_status_kib(key: str) -> int:
    """A kB figure of this process from ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: CPU peak memory needs Linux")


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so one method's leftovers do not hide the next one's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is then a little higher, never wrong
        pass

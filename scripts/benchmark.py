"""SMT vs SMT + regrowth vs LoRA vs full fine-tuning on one harness: same model, data, seed, batch, length.

    python scripts/benchmark.py             # CPU default: SmolLM2-135M-Instruct on an ARC-Easy slice (~25 min)
    python scripts/benchmark.py --tiny      # smoke run in about a minute: tiny random Llama (CI runs this)
    python scripts/benchmark.py --methods smt lora --steps 40 --task boolq --out runs/bench-boolq
    python scripts/benchmark.py --tiny --methods smt smt+regrowth smt+regrowth-ma --steps 120 --warmup 10
                                            # static selection vs SpIEL-style regrowth (AG, MA growth scores)

Every method runs in this process, one after another, from the same weights and the same batches in the
same order. LoRA (peft) gets the same target modules and its rank is matched to SMT's trainable-parameter
count. Each method trains ``--steps`` optimizer steps; SMT's warm-up is inside them (warm-up steps update
nothing), so SMT makes fewer updates than the others — a handicap, never a head start.

Measured per method: trainable parameters; median step time over the updating steps (the first
``--skip`` are left out: allocator and cache warm-up); peak memory above the memory held before the
method's model was built (CUDA: max allocated; CPU: the process's peak resident set, VmHWM, reset
through ``/proc/self/clear_refs``); the analytic bytes of weights + gradients + AdamW state (noise
free); the warm-up's share of the training wall time; for regrowth, the median step time inside its scoring windows
over the other tuning steps of the same run (noise cancels); the final validation loss; and the test accuracy of the
most likely label (``smt.eval`` likelihood scorer). A table goes to stdout and
``benchmark.md``; the raw numbers to ``benchmark.json``; loss curves and bars to ``benchmark.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from harness import PeakMemory, StepClock, arm_callbacks, cpu_trainer, language_model, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "llm_adapters"
SMOLLM2 = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct"
METHODS = ("full", "lora", "smt", "smt+regrowth", "smt+regrowth-ma")
DEFAULT_METHODS = METHODS[:4]


# --- settings ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the methods share. Defaults are the CPU run; ``tiny()`` is the smoke run."""

    model: str | None = str(SMOLLM2)
    model_config: dict | None = None
    tokenizer: str | None = None
    task: str = "ARC-Easy"
    train_path: str = ""
    test_path: str = ""
    steps: int = 48
    warmup: int = 4
    batch_size: int = 4
    max_length: int = 192
    val_split: int = 48
    limit_test: int = 160
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    block_size: int = 64
    rank: int = 8
    lr: dict[str, float] = field(default_factory=lambda: {"full": 5e-5, "lora": 1e-3, "smt": 2e-3})
    seed: int = 0
    skip: int = 2
    cache_dir: str | None = None
    gradient_checkpointing: bool = False

    @classmethod
    def tiny(cls) -> Setup:
        return cls(model=None, model_config=tiny_llama("small"), tokenizer="bytes", steps=16, warmup=2, batch_size=8,
                   max_length=160, val_split=16, limit_test=16, block_size=16, rank=4,
                   lr={"full": 2e-3, "lora": 1e-2, "smt": 2e-2})  # fmt: skip


@dataclass
class Result:
    method: str
    trainable: int = 0
    total: int = 0
    step_s: float = float("nan")
    peak_mb: float = float("nan")
    state_mb: float = float("nan")
    warmup_share: float = 0.0
    window_ratio: float = float("nan")
    val_loss: float = float("nan")
    accuracy: float = float("nan")
    fit_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    note: str = ""


# --- measuring --------------------------------------------------------------------------------------


def state_mb(module: torch.nn.Module) -> float:
    """Weights + gradients + AdamW moments in MB, from the parameters (the noise-free part of the peak)."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return (weights + 3 * trainable) / 2**20


# --- methods ----------------------------------------------------------------------------------------


def build(setup: Setup, method: str):
    """The module and callbacks of one method, from the same seed and weights."""
    from smt.core.config import RegrowthConfig

    lr = setup.lr["smt" if method.startswith("smt") else method]
    module = language_model(setup.model, setup.model_config, setup.tokenizer, setup.seed, lr=lr, scheduler="cosine",
                            lr_warmup_steps=2, min_lr_ratio=0.1,
                            gradient_checkpointing=setup.gradient_checkpointing)  # fmt: skip
    smt_settings = {}
    if method.startswith("smt+regrowth"):
        every = max(4, setup.steps // 6)
        growth = "ma" if method.endswith("-ma") else "ag"
        regrowth = RegrowthConfig(every=every, accumulate=max(1, every // 4), rate=0.2, criterion=growth)
        smt_settings["regrowth"] = regrowth
    kind = "smt" if method.startswith("smt") else method
    callbacks = arm_callbacks(module, kind, setup.targets, setup.rank, block_size=setup.block_size,
                              warmup_steps=setup.warmup, criterion="grad_sq", **smt_settings)  # fmt: skip
    clock = StepClock(callbacks[0] if callbacks else None)
    return module, [*callbacks, clock], clock


def datamodule(setup: Setup, tokenizer):
    from smt.lightning.datamodule import InstructionDataModule

    data = InstructionDataModule(train_path=setup.train_path, test_paths=[setup.test_path], val_split=setup.val_split,
                                 batch_size=setup.batch_size, eval_batch_size=16, max_length=setup.max_length,
                                 limit_train=setup.steps * setup.batch_size, limit_test=setup.limit_test,
                                 seed=setup.seed, cache_dir=setup.cache_dir)  # fmt: skip
    data.set_tokenizer(tokenizer)
    return data


def trainer(callbacks: list, steps: int = -1):
    """Fit without validation (``steps`` > 0), or validate/test (the default)."""
    return cpu_trainer(steps, callbacks, accelerator="auto", limit_val_batches=0 if steps > 0 else None,
                       inference_mode=False)  # fmt: skip


def evaluate(module, data) -> tuple[float, float]:
    """Validation loss and test accuracy (most likely label) of ``module`` as it is now."""
    check = trainer([])
    val_loss = float(check.validate(module, datamodule=data, verbose=False)[0]["val/loss"])
    metrics = check.test(module, datamodule=data, verbose=False)[0]
    found = [v for k, v in metrics.items() if k.startswith("test/acc_")]
    return val_loss, float(found[0]) if found else float("nan")


def run_method(setup: Setup, method: str, memory: PeakMemory) -> Result:
    """Train one method and measure it; the model is freed before returning."""
    memory.start()
    module, callbacks, clock = build(setup, method)
    data = datamodule(setup, module.tokenizer)
    fit = trainer(callbacks, setup.steps)
    start = time.perf_counter()
    fit.fit(module, datamodule=data)
    fit_s = time.perf_counter() - start
    peak = memory.peak_mb()  # before evaluation: the peak of training
    val_loss, acc = evaluate(module, data)
    result = Result(method, trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
                    total=sum(p.numel() for p in module.parameters()), step_s=clock.median_update_step(setup.skip),
                    peak_mb=peak, state_mb=state_mb(module), warmup_share=clock.warmup_share(),
                    window_ratio=clock.window_ratio(), val_loss=val_loss,
                    accuracy=acc, fit_s=fit_s, losses=clock.losses, times=clock.times)  # fmt: skip
    del module, data, fit, callbacks, clock
    gc.collect()
    return result


def run_base(setup: Setup) -> Result:
    """The untuned model's validation loss and accuracy (the floor every method starts from)."""
    module = language_model(setup.model, setup.model_config, setup.tokenizer, setup.seed)
    val_loss, acc = evaluate(module, datamodule(setup, module.tokenizer))
    total = sum(p.numel() for p in module.parameters())
    return Result("base (untuned)", total=total, val_loss=val_loss, accuracy=acc)


def preload() -> None:
    """Import what the methods use before any measurement: imports would count as the first method's memory."""
    import peft  # noqa: F401

    import smt.eval  # noqa: F401
    import smt.lightning.callback  # noqa: F401
    import smt.lightning.module  # noqa: F401


# --- data -------------------------------------------------------------------------------------------


def write_generated_task(folder: Path, seed: int = 0) -> Path:
    """A true/false task in BoolQ's format for machines without ``../shared/data``: "is a greater than b?" over
    ordered pairs of 0–39, shuffled with ``seed`` and split into disjoint ``train.json`` / ``test.json``."""
    import random

    pairs = [(a, b) for a in range(40) for b in range(40) if a != b]
    random.Random(seed).shuffle(pairs)
    rows = []
    for a, b in pairs:
        answer = str(a > b).lower()
        rows.append({
            "instruction": f"Please answer the following question with true or false, question: is {a} greater "
                           f"than {b}?\n\nAnswer format: true/false",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer,
        })  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    split = len(rows) * 3 // 4
    (folder / "train.json").write_text(json.dumps(rows[:split]))
    (folder / "test.json").write_text(json.dumps(rows[split:]))
    return folder


def resolve_data(setup: Setup, out: Path) -> str:
    """Point the setup at ``../shared/data`` when it is there, else at a generated task; say which."""
    folder = DATA / setup.task
    if (folder / "train.json").is_file() and (folder / "test.json").is_file():
        setup.train_path, setup.test_path = str(folder / "train.json"), str(folder / "test.json")
        return f"{setup.task} from {folder}"
    setup.task = "boolq"
    generated = write_generated_task(out / "generated" / "boolq")
    setup.train_path, setup.test_path = str(generated / "train.json"), str(generated / "test.json")
    return f"no {folder}: a generated true/false task in BoolQ's format, written to {generated}"


# --- reporting --------------------------------------------------------------------------------------


def _ratio(value: float, reference: Result | None, key: str) -> str:
    if reference is None or not getattr(reference, key) > 0:
        return "–"
    return f"{value / getattr(reference, key):.2f}"


def table(results: list[Result]) -> str:
    """Markdown table; ratios are against full FT and LoRA measured in the same run."""
    by_name = {r.method: r for r in results}
    full, lora = by_name.get("full"), by_name.get("lora")
    lines = [
        "| method | trainable params | % of model | median step s | × full FT | × LoRA | peak MB | × full FT | "
        "× LoRA | weights+grads+AdamW MB | warm-up share | regrowth window step ÷ other step | val loss | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.trainable:
            lines.append(f"| {r.method} | 0 | 0 | – | – | – | – | – | – | – | – | – | {r.val_loss:.4f} | "
                         f"{100 * r.accuracy:.1f} % |")  # fmt: skip
            continue
        window = "–" if math.isnan(r.window_ratio) else f"{r.window_ratio:.2f}"
        lines.append(
            f"| {r.method} | {r.trainable:,} | {100 * r.trainable / r.total:.3f} | {r.step_s:.3f} | "
            f"{_ratio(r.step_s, full, 'step_s')} | {_ratio(r.step_s, lora, 'step_s')} | {r.peak_mb:.0f} | "
            f"{_ratio(r.peak_mb, full, 'peak_mb')} | {_ratio(r.peak_mb, lora, 'peak_mb')} | {r.state_mb:.0f} | "
            f"{100 * r.warmup_share:.1f} % | {window} | {r.val_loss:.4f} | {100 * r.accuracy:.1f} % |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.trainable]
    fig, (curves, steps, memory) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in trained:
        window = max(1, len(r.losses) // 12)
        smooth = [statistics.mean(r.losses[max(0, i - window + 1) : i + 1]) for i in range(len(r.losses))]
        curves.plot(range(1, len(smooth) + 1), smooth, label=r.method, linewidth=1.2)
    curves.set(xlabel="optimizer step", ylabel=f"train loss (moving mean of {window})", title="training loss")
    curves.legend()
    names = [r.method for r in trained]
    steps.bar(names, [r.step_s for r in trained], color="tab:blue")
    steps.set(ylabel="median step s", title="step time")
    memory.bar(names, [r.peak_mb for r in trained], color="tab:orange", label="peak")
    memory.bar(names, [r.state_mb for r in trained], color="tab:gray", alpha=0.6, label="weights+grads+AdamW")
    memory.set(ylabel="MB above baseline", title="peak memory")
    memory.legend()
    for axis in (steps, memory):
        axis.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def describe(setup: Setup, data: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    model = setup.model or f"random Llama {setup.model_config['hidden_size']}×{setup.model_config['num_hidden_layers']}"
    return (f"{model} · {data} · {device} · torch {torch.__version__} · {platform.machine()} · steps {setup.steps} "
            f"(SMT warm-up {setup.warmup} inside) · batch {setup.batch_size} × ≤{setup.max_length} tokens · "
            f"targets {','.join(setup.targets)} · LoRA rank {setup.rank} vs SMT {setup.block_size}² blocks · "
            f"lr {setup.lr} · seed {setup.seed} · gradient checkpointing {setup.gradient_checkpointing} · "
            f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip


# --- main -------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[Setup, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama, about a minute")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS), help="methods to run")
    parser.add_argument("--model", help="model folder (save_pretrained layout); default SmolLM2-135M-Instruct")
    parser.add_argument("--task", help="LLM-Adapters task folder under ../shared/data/llm_adapters")
    parser.add_argument("--steps", type=int, help="optimizer steps per method (SMT's warm-up included)")
    parser.add_argument("--warmup", type=int, help="SMT warm-up steps")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--max-length", type=int, help="longest sequence in tokens")
    parser.add_argument("--limit-test", type=int, help="test questions scored per method")
    parser.add_argument("--rank", type=int, help="LoRA rank; SMT gets as many trainable weights")
    parser.add_argument("--seed", type=int, help="seed of weights init, data order and selection ties")
    parser.add_argument("--lr", nargs=2, action="append", metavar=("KIND", "LR"), default=[],
                        help="learning rate of full, lora or smt, e.g. --lr smt 1e-3 (repeatable)")  # fmt: skip
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward, every method (less memory, more time)")  # fmt: skip
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the untuned model")
    parser.add_argument("--out", default="runs/benchmark", help="folder for benchmark.{md,json,png}")
    args = parser.parse_args(argv)
    setup = Setup.tiny() if args.tiny else Setup()
    for name in ("model", "task", "steps", "warmup", "batch_size", "max_length", "limit_test", "rank", "seed"):
        if getattr(args, name) is not None:
            setattr(setup, name, getattr(args, name))
    setup.gradient_checkpointing = args.gradient_checkpointing
    for kind, value in args.lr:
        if kind not in setup.lr:
            parser.error(f"--lr {kind}: the method kinds are {', '.join(setup.lr)}")
        setup.lr[kind] = float(value)
    if setup.warmup >= setup.steps:
        parser.error(f"--warmup {setup.warmup} must be below --steps {setup.steps}: SMT would never update")
    return setup, args


def main(argv: list[str]) -> int:
    setup, args = parse(argv)
    if setup.model and not Path(setup.model).is_dir():
        from smt.lightning.pretrained import prepare_smollm2

        try:
            setup.model = str(prepare_smollm2(SMOLLM2)[0])
        except FileNotFoundError as err:
            print(f"benchmark: error: {err}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(setup, out)
    setup.cache_dir = str(out / "cache")  # tokenized once, memory-mapped by every later method
    preload()
    torch.set_float32_matmul_precision("high")
    memory = PeakMemory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    header = describe(setup, data)
    print(header, flush=True)
    results = [] if args.no_base else [run_base(setup)]
    for method in args.methods:
        results.append(run_method(setup, method, memory))
        print(f"{method}: {results[-1].fit_s:.0f} s, val loss {results[-1].val_loss:.4f}", flush=True)
    report = f"{header}\n\n{table(results)}\n"
    print("\n" + report)
    (out / "benchmark.md").write_text(report)
    (out / "benchmark.json").write_text(json.dumps({"setup": asdict(setup), "results": [asdict(r) for r in results]}))
    plot(results, out / "benchmark.png", f"{Path(setup.model).name if setup.model else 'tiny Llama'} · {setup.task}")
    print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / 'benchmark.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

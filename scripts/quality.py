"""Quality benchmark: SMT (each criterion), random blocks, S²FT-style strips, regrowth, LoRA and full FT, compared
on held-out real tasks at equal trainable budget, with learning rates chosen on a validation split.

    python scripts/quality.py run --task alpaca --arm smt:grad_sq --lr 1e-3 --seed 0   # one cell (cached)
    python scripts/quality.py study --plan sweep --tasks alpaca                        # every missing cell of a plan
    python scripts/quality.py report                                                   # docs/quality.md + .png
    python scripts/quality.py --tiny --out /tmp/q                                      # smoke run (CI), ~1 min

Tasks (from ``../shared/data``; each split fixed by a seeded shuffle, disjoint):
- ``alpaca``: instruction tuning on ``alpaca/alpaca_5000.json``; held-out response-token NLL.
- ``gsm8k``: ``gsm8k/train.jsonl`` → ``test.jsonl`` response-token NLL (calculator notes removed); greedy
  exact match on ``--em`` test questions where asked.
- ``arc_easy``: ARC-Easy (LLM-Adapters files) with the *answer text* as the response; accuracy = the choice
  whose text is most likely (lm-eval style, summed log-probability normalised by the text's length in bytes),
  so the untuned model is neither at chance nor at ceiling; also the correct answer's NLL.
- ``facts-N`` (generated, ``smt.eval.knowledge``): N facts about fictional people, trained in three question
  wordings for ``--epochs``; recall (the true value ranked first of the attribute's 20) in the trained wording and
  in two never-trained ones (``val_recall``, ``test_recall``); NLL of the answers asked in the held-out wordings.
Every run also reports forgetting: WikiText-2 NLL (fixed windows of its test split) after tuning.

Arms (``--arm``): ``full``, ``lora``, ``rslora`` (LoRA scaled by α/√r), ``smt:<criterion>`` (64² blocks, the best
blocks anywhere; ``smt:<criterion>@32`` for 32² blocks), ``spread:<criterion>`` (SMT with
``allocation=proportional``: each module's share of the budget by its size, its best blocks by the criterion),
``strips:<criterion>`` (whole output rows, S²FT-style), ``regrow:<criterion>`` (SMT + SpIEL-style AG regrowth).
Budgets: ``r8`` / ``r32`` = as many trainable weights as LoRA of that rank on the same targets (counted exactly
and reported); targets ``qkv``, ``v``, ``all`` (every linear layer of the decoder). Every arm trains ``--steps``
optimizer steps on the same batches in the same order (the data seed is the run's seed); SMT's warm-up steps are
inside that budget.

Results: one JSON per (task, targets, budget, arm, seed, lr) under ``--out`` (default ``docs/quality/raw``), so a
long study accumulates across runs and sessions; ``report`` picks each arm's LR by validation NLL (seed 0),
then reports test metrics at that LR as mean ± std over the seeds present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import StepClock, arm_callbacks, cpu_trainer, language_model, tiny_llama

from smt.eval.heldout import choice_accuracy, exact_match, response_nll, text_nll

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOLLM2 = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = ROOT / "docs" / "quality" / "raw"
TARGETS = {
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "v": ["v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
TINY_MODEL = tiny_llama("debug")


# --- settings ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run: what is trained, on what, how long, and with which learning rate and seed."""

    task: str
    arm: str
    lr: float
    seed: int = 0
    targets: str = "qkv"
    budget: str = "r8"
    steps: int = 100
    batch_size: int = 8
    warmup: int = 5
    block_size: int = 64
    em: int = 0
    precision: str = "bf16-mixed"

    def key(self) -> str:
        budget = "dense" if self.arm == "full" else f"{self.targets}-{self.budget}"
        suffix = "" if self.steps == 100 else f"-steps{self.steps}"
        suffix += "" if self.precision == "bf16-mixed" else "-fp32"
        return f"{self.task}/{budget}/{self.arm.replace(':', '-')}/seed{self.seed}-lr{self.lr:g}{suffix}.json"


@dataclass
class Harness:
    """Where the model and data come from, and how much is evaluated (``tiny()`` is the CI smoke run)."""

    model: str | None = str(SMOLLM2)
    model_config: dict | None = None
    tokenizer: str | None = None
    data_root: Path = SHARED
    out: Path = DEFAULT_OUT
    work: Path = ROOT / "runs" / "quality-work"
    max_length: int = 192
    n_val: int = 100
    n_test: int = 200
    n_arc_test: int = 300
    wiki_windows: int = 24
    wiki_tokens: int = 256
    precision: str = "bf16-mixed"
    """Training precision: ``bf16-mixed`` (autocast, fp32 weights and optimizer state) where the CPU multiplies
    bf16 natively (2.65× faster per step than fp32 here), else ``32-true``; evaluation always runs in fp32."""

    @classmethod
    def tiny(cls, out: Path) -> Harness:
        return cls(model=None, model_config=TINY_MODEL, tokenizer="bytes", data_root=out / "data", out=out / "raw",
                   work=out / "work",
                   max_length=96, n_val=8, n_test=8, n_arc_test=8, wiki_windows=2, wiki_tokens=64)  # fmt: skip


# --- data ---------------------------------------------------------------------------------------------

ARC_CHOICE = re.compile(r"Answer(\d):\s*(.*?)(?=\s*Answer\d:|\n\nAnswer format|$)", re.S)


def _shuffled(rows: list, seed: int = 1234) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _record(instruction: str, response: str, answer: str = "", input_text: str = "") -> dict:
    return {"instruction": instruction, "input": input_text, "output": response, "answer": answer}


def alpaca_splits(root: Path, harness: Harness) -> dict[str, list[dict]]:
    rows = _shuffled(json.loads((root / "alpaca" / "alpaca_5000.json").read_text()))
    records = [_record(r["instruction"], r["output"], input_text=r.get("input", "")) for r in rows]
    n_test, n_val = harness.n_test, harness.n_val
    return {"test": records[:n_test], "val": records[n_test : n_test + n_val], "train": records[n_test + n_val :]}


def _gsm8k_record(row: dict) -> dict:
    solution, _, number = row["answer"].rpartition("####")
    response = re.sub(r"<<[^<>]*>>", "", solution).strip() + f"\n#### {number.strip()}"
    return _record(row["question"], response, number.strip().replace(",", ""))


def gsm8k_splits(root: Path, harness: Harness) -> dict[str, list[dict]]:
    def read(name: str) -> list[dict]:
        lines = (root / "gsm8k" / name).read_text().splitlines()
        return [_gsm8k_record(json.loads(line)) for line in lines if line.strip()]

    train, test = _shuffled(read("train.jsonl")), _shuffled(read("test.jsonl"))
    return {"test": test[: harness.n_test], "val": train[: harness.n_val], "train": train[harness.n_val :]}


def arc_record(row: dict) -> dict | None:
    """An LLM-Adapters ARC record as question → answer text, with the choices kept for scoring."""
    question = row["instruction"].split("\n\n")[0].removeprefix("Please choose the correct answer to the question: ")
    choices = {f"answer{n}": text.strip() for n, text in ARC_CHOICE.findall(row["instruction"])}
    if row["answer"] not in choices or len(choices) < 2:
        return None
    record = _record(question, choices[row["answer"]], row["answer"])
    record["choices"], record["label"] = list(choices.values()), list(choices).index(row["answer"])
    return record


def arc_splits(root: Path, harness: Harness) -> dict[str, list[dict]]:
    folder = root / "llm_adapters" / "ARC-Easy"

    def read(name: str) -> list[dict]:
        return [r for r in map(arc_record, json.loads((folder / name).read_text())) if r is not None]

    train, test = _shuffled(read("train.json")), _shuffled(read("test.json"))
    return {"test": test[: harness.n_arc_test], "val": train[: harness.n_val], "train": train[harness.n_val :]}


TASKS = {"alpaca": alpaca_splits, "gsm8k": gsm8k_splits, "arc_easy": arc_splits}
KNOWLEDGE_SIZES = (40, 160, 640)
"""``facts-N`` tasks the study knows (any multiple of 4 runs with ``run --task facts-N``)."""


def is_knowledge_task(task: str) -> bool:
    return re.fullmatch(r"facts-\d+", task) is not None


def task_splits(task: str, harness: Harness) -> dict[str, list[dict]]:
    """The records of ``task``: a file-backed task from ``harness.data_root``, or a generated ``facts-N`` task."""
    if is_knowledge_task(task):
        from smt.eval.knowledge import knowledge_splits

        return knowledge_splits(int(task.removeprefix("facts-")), harness.n_test)
    return TASKS[task](harness.data_root, harness)


def task_template(task: str) -> str:
    """The prompt template a task trains and is scored with (facts: the short ``Question:/Answer:`` form)."""
    return "gsm8k" if is_knowledge_task(task) else "alpaca"


EPOCHS = 8
"""Passes over a ``facts-N`` training set (every fact in three wordings)."""


def task_steps(task: str, steps: int | None, epochs: float, batch_size: int = 8) -> int:
    """Optimizer steps of a cell: ``steps`` if given, else 100, or ``epochs`` passes over a facts task's records."""
    if steps is not None:
        return steps
    if not is_knowledge_task(task):
        return 100
    from smt.eval.knowledge import TRAIN_WORDINGS

    records = int(task.removeprefix("facts-")) * len(TRAIN_WORDINGS)
    return max(1, round(epochs * records / batch_size))


def task_name(name: str) -> str:
    """argparse type: a known task name, or ``facts-N``."""
    if name in TASKS or is_knowledge_task(name):
        return name
    raise argparse.ArgumentTypeError(f"unknown task {name!r}; use one of {', '.join(TASKS)} or facts-N (N facts)")


def wikitext_windows(root: Path, tokenizer, harness: Harness) -> list[list[int]]:
    """Fixed, evenly spaced windows of the WikiText-2 test split (the forgetting probe)."""
    text = (root / "wikitext-2" / "test.txt").read_text()
    ids = tokenizer(text[: 400 * harness.wiki_windows * harness.wiki_tokens], add_special_tokens=False)["input_ids"]
    stride = max(harness.wiki_tokens, len(ids) // harness.wiki_windows)
    return [ids[i : i + harness.wiki_tokens] for i in range(0, stride * harness.wiki_windows, stride)]


def write_tiny_data(root: Path) -> None:
    """A generated stand-in for ``../shared/data`` (the smoke run must not need it)."""
    rng = random.Random(0)
    sums = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(80)]
    alpaca = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"} for a, b in sums]
    (root / "alpaca").mkdir(parents=True, exist_ok=True)
    (root / "alpaca" / "alpaca_5000.json").write_text(json.dumps(alpaca))
    (root / "gsm8k").mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### "
                        f"{a + b}"}) for a, b in sums]  # fmt: skip
    for name in ("train.jsonl", "test.jsonl"):
        (root / "gsm8k" / name).write_text("\n".join(rows))
    arc = []
    for a, b in sums:
        options = [a + b, a + b + 1, a + b + 2, abs(a - b) + 20]
        rng.shuffle(options)
        listing = " ".join(f"Answer{i + 1}: {v}" for i, v in enumerate(options))
        instruction = (
            f"Please choose the correct answer to the question: {a} plus {b}?\n\n{listing}\n\nAnswer format: x"
        )
        arc.append(
            {"instruction": instruction, "input": "", "output": "", "answer": f"answer{options.index(a + b) + 1}"}
        )
    (root / "llm_adapters" / "ARC-Easy").mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "test.json"):
        (root / "llm_adapters" / "ARC-Easy" / name).write_text(json.dumps(arc))
    (root / "wikitext-2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2" / "test.txt").write_text(" The quick brown fox jumps over the lazy dog . " * 200)


# --- evaluation ---------------------------------------------------------------------------------------


def evaluate(model, tokenizer, splits: dict, cell: Cell, harness: Harness, windows: list[list[int]]) -> dict:
    """Every metric of one trained (or untuned) model, in eval mode."""
    model.eval()
    template = task_template(cell.task)
    metrics = {
        "val_nll": response_nll(model, tokenizer, splits["val"], harness.max_length, template=template),
        "test_nll": response_nll(model, tokenizer, splits["test"], harness.max_length, template=template),
        "wiki_nll": text_nll(model, windows),
    }
    if cell.task == "arc_easy":
        metrics["val_acc"] = choice_accuracy(model, tokenizer, splits["val"])
        metrics["test_acc"] = choice_accuracy(model, tokenizer, splits["test"])
    if cell.task == "gsm8k" and cell.em:
        metrics["test_em"] = exact_match(model, tokenizer, splits["test"][: cell.em])
    if is_knowledge_task(cell.task):
        metrics["trained_nll"] = response_nll(model, tokenizer, splits["trained"], harness.max_length,
                                              template=template)  # fmt: skip
        for split in ("trained", "val", "test"):
            metrics[f"{split}_recall"] = fact_recall(model, tokenizer, splits[split], template)
    return metrics


def fact_recall(model, tokenizer, records: list[dict], template: str) -> float:
    """Share of facts whose true value is the most likely of all the attribute's values (``smt.eval.recall``)."""
    from smt.eval.recall import recall
    from smt.data.prompts import adds_special_tokens, render_prompt, render_response

    prompts = [render_prompt(template, r["instruction"]) for r in records]
    prefixes = [render_response(template, r["context"]) for r in records]
    return recall(model, tokenizer, prompts, prefixes, [r["choices"] for r in records], [r["label"] for r in records],
                  special_tokens=adds_special_tokens(template))  # fmt: skip


# --- methods ------------------------------------------------------------------------------------------


def build_module(cell: Cell, harness: Harness):
    """The LightningModule and callbacks of one arm, from the same seed and weights, at LoRA ``cell.budget``'s size."""
    from smt.core.config import RegrowthConfig
    from smt.core.scoring import get_criterion

    module = language_model(harness.model, harness.model_config, harness.tokenizer, cell.seed, lr=cell.lr,
                            scheduler="cosine", lr_warmup_steps=3, min_lr_ratio=0.1)  # fmt: skip
    kind, _, criterion = cell.arm.partition(":")
    criterion, _, side = criterion.partition("@")  # "grad_sq@32": 32² blocks instead of the cell's default
    rank, targets = int(cell.budget.removeprefix("r")), TARGETS[cell.targets]
    if kind in ("full", "lora", "rslora"):
        return module, arm_callbacks(module, kind, targets, rank)
    block = (1, -1) if kind == "strips" else int(side) if side else cell.block_size
    regrowth = RegrowthConfig(every=20, accumulate=5, rate=0.2, criterion="ag") if kind == "regrow" else None
    warmup = cell.warmup if get_criterion(criterion).needs_gradients else 0
    allocation = "proportional" if kind == "spread" else "global"
    return module, arm_callbacks(module, "smt", targets, rank, block_size=block, warmup_steps=warmup,
                                 criterion=criterion, regrowth=regrowth, seed=cell.seed,
                                 allocation=allocation)  # fmt: skip


class LossCurve(StepClock):
    """The step clock, printing the mean loss of every 10 steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if len(self.losses) % 10 == 0:
            print(f"quality: step {len(self.losses)} loss {statistics.mean(self.losses[-10:]):.4f}", flush=True)


def train(cell: Cell, harness: Harness, splits: dict, module, callbacks: list) -> dict:
    """Fit ``cell.steps`` optimizer steps on the training split; the loss curve and wall time."""
    from smt.lightning.datamodule import InstructionDataModule

    path = harness.work / "splits" / cell.task / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ("instruction", "input", "output", "answer")
    path.write_text(json.dumps([{k: r[k] for k in fields} for r in splits["train"]]))
    data = InstructionDataModule(train_path=str(path), batch_size=cell.batch_size, max_length=harness.max_length,
                                 limit_train=cell.steps * cell.batch_size, seed=cell.seed,
                                 template=task_template(cell.task), cache_dir=str(harness.work / "cache"))  # fmt: skip
    data.set_tokenizer(module.tokenizer)
    curve = LossCurve()
    trainer = cpu_trainer(cell.steps, [*callbacks, curve], cell.precision, accelerator="cpu", limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"train_s": round(time.perf_counter() - start, 1), "median_step_s": round(statistics.median(curve.times), 3),
            "losses": [round(loss, 5) for loss in curve.losses], "steps": trainer.global_step}  # fmt: skip


def selection_stats(model) -> dict:
    """Where an SMT selection put its blocks: modules used, and the share of each input column block."""
    from smt.core.model import current_selection, sparse_layers

    selection = current_selection(model)
    columns: dict[int, int] = {}
    for index in selection.blocks.values():
        for col in index[:, 1].tolist():
            columns[col] = columns.get(col, 0) + 1
    per_module = {name: int(index.shape[0]) for name, index in selection.blocks.items() if index.shape[0]}
    return {"modules_used": len(per_module), "modules": len(sparse_layers(model)), "blocks": selection.num_blocks,
            "column_blocks": dict(sorted(columns.items())), "per_module": per_module}  # fmt: skip


def run_cell(cell: Cell, harness: Harness) -> dict:
    """Train and evaluate one cell; the result (also written to its JSON file)."""
    import torch

    from smt.core.merge import merged
    from smt.core.model import get_bank

    splits = task_splits(cell.task, harness)
    module, callbacks = build_module(cell, harness)
    windows = wikitext_windows(harness.data_root, module.tokenizer, harness)
    record = {"cell": asdict(cell), "harness": {k: str(v) for k, v in asdict(harness).items()}}
    record["trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    record.update(train(cell, harness, splits, module, callbacks))
    model = module.model
    if get_bank(model) is not None:
        record["trainable"] = sum(p.numel() for p in get_bank(model).parameters())
        record["selection"] = selection_stats(model)
    with merged(model) if get_bank(model) is not None else torch.no_grad():
        record["metrics"] = evaluate(model, module.tokenizer, splits, cell, harness, windows)
    record["machine"] = {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "host": platform.node()}  # fmt: skip
    return record


def run_base(task: str, harness: Harness) -> dict:
    """The untuned model's metrics on ``task`` (the floor every arm starts from)."""
    cell = Cell(task=task, arm="base", lr=0.0, em=exact_match_questions(task))
    splits = task_splits(task, harness)
    module = language_model(harness.model, harness.model_config, harness.tokenizer, seed=0)
    windows = wikitext_windows(harness.data_root, module.tokenizer, harness)
    return {"cell": asdict(cell), "metrics": evaluate(module.model, module.tokenizer, splits, cell, harness, windows)}


# --- the study ----------------------------------------------------------------------------------------

LR_GRID = {"full": [1e-4, 3e-4, 3e-5], "default": [1e-3, 3e-3, 3e-4], "facts": [3e-3, 1e-3, 1e-2]}
"""Seed-0 learning rates per arm, tried in this order (the middle first, so an early stop still compares arms)."""
HEADLINE = ["lora", "smt:grad_sq", "smt:random", "smt:grad_snr", "full"]
SELECTION_ARMS = ["smt:grad_sq", "smt:random", "smt:grad_snr", "smt:grad_sq_xnorm"]
PLANS = {
    "sweep": [*HEADLINE[:4], "smt:grad_sq_xnorm", "full"],
    "headline": HEADLINE,
    "core": HEADLINE[:4],  # the arms the targets compare: LoRA, SMT's two candidate defaults, random blocks
    "structure": ["strips:random", "strips:grad_snr", "regrow:grad_snr"],
    # where sparse capacity should matter (facts-N): the default, its per-module spread, random blocks, the ceiling
    "capacity": ["lora", "smt:grad_sq", "spread:grad_sq", "smt:random", "full"],
    "spread": ["spread:grad_sq"],
}


def exact_match_questions(task: str) -> int:
    """GSM8K test questions answered by greedy generation in the study's cells: none. At this scale (135M, 100
    steps) exact match sits at 2–3 % for the untuned model and LoRA alike (3/100, 2/100), so it ranks nothing,
    while 100 greedy generations cost as much as the training (~7 min on one core). ``run --em N`` still
    measures it for one cell."""
    return 0


def result_path(cell: Cell, harness: Harness) -> Path:
    return harness.out / cell.key()


def load_results(out: Path, precision: str | None = None) -> list[dict]:
    """Every cached result trained at ``precision`` (None: all; records from before the field existed are fp32)."""
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json")) if p.name != "base.json"]
    return [r for r in records if precision is None or r["cell"].get("precision", "32-true") == precision]


def best_lr(results: list[dict], task: str, arm: str, targets: str, budget: str) -> float | None:
    """The LR with the lowest validation NLL among seed-0 runs of this arm (None if none ran)."""
    runs = [r for r in results if _matches(r, task, arm, targets, budget) and r["cell"]["seed"] == 0]
    return min(runs, key=lambda r: r["metrics"]["val_nll"])["cell"]["lr"] if runs else None


def _matches(r: dict, task: str, arm: str, targets: str, budget: str) -> bool:
    c = r["cell"]
    same_budget = arm == "full" or (c["targets"] == targets and c["budget"] == budget)
    return c["task"] == task and c["arm"] == arm and same_budget


def sweep_cells(results: list[dict], task: str, arm: str, targets: str, budget: str, steps: int,
                precision: str = "bf16-mixed") -> list[Cell]:  # fmt: skip
    """The next seed-0 LRs to try: the grid, then one step (×3) beyond an edge that is still the best."""
    grid = LR_GRID.get(arm, LR_GRID["default"])
    if is_knowledge_task(task) and arm != "full":
        grid = LR_GRID["facts"]  # storing facts wants larger steps than format learning: start one ×3 higher
    done = {r["cell"]["lr"] for r in results if _matches(r, task, arm, targets, budget) and r["cell"]["seed"] == 0}
    todo = [lr for lr in grid if lr not in done]
    if not todo and done:
        best = best_lr(results, task, arm, targets, budget)
        if best == max(done):
            todo = [round(best * 3, 10)]
        elif best == min(done):
            todo = [round(best / 3, 10)]
    return [Cell(task, arm, lr, 0, targets, budget, steps, em=exact_match_questions(task), precision=precision)
            for lr in todo]  # fmt: skip


def next_cells(plan: str, tasks: list[str], targets: str, budget: str, seeds: int, steps: int | None, harness: Harness,
               epochs: float = 8):  # fmt: skip
    """The plan's missing cells, one at a time: the LR sweeps round-robin over the arms (each next LR depends on
    what the earlier ones found), then the extra seeds of every arm at its chosen LR."""
    arms, requested = PLANS[plan], steps
    for task in tasks:
        steps = task_steps(task, requested, epochs)
        pending = True
        while pending:
            pending = False
            for arm in arms:
                results = load_results(harness.out, harness.precision)
                todo = sweep_cells(results, task, arm, targets, budget, steps, harness.precision)
                if todo:
                    pending = True
                    yield todo[0]
        if plan == "sweep":
            continue
        for seed in range(1, seeds):
            for arm in arms:
                lr = best_lr(load_results(harness.out, harness.precision), task, arm, targets, budget)
                yield Cell(task, arm, lr, seed, targets, budget, steps, em=exact_match_questions(task),
                           precision=harness.precision)  # fmt: skip


def run_in_subprocess(cell: Cell, harness: Harness, threads: int = 0) -> bool:
    """One cell in a fresh process (a crash or leak costs one cell); True when its result file exists."""
    args = [sys.executable, __file__, "run", "--task", cell.task, "--arm", cell.arm, "--lr", str(cell.lr),
            "--seed", str(cell.seed), "--targets", cell.targets, "--budget", cell.budget, "--steps", str(cell.steps),
            "--em", str(cell.em), "--out", str(harness.out), "--precision", cell.precision]  # fmt: skip
    if harness.model_config is not None:
        args.append("--tiny-model")
    if threads:
        args += ["--threads", str(threads)]
    subprocess.run(args, check=False)
    return result_path(cell, harness).is_file()


def study(args, harness: Harness) -> int:
    for task in args.tasks:
        base = harness.out / task / "base.json"
        if not base.is_file():
            _write(base, run_base(task, harness))
    for cell in next_cells(args.plan, args.tasks, args.targets, args.budget, args.seeds, args.steps, harness,
                           args.epochs):  # fmt: skip
        if result_path(cell, harness).is_file():
            continue
        print(f"quality: {cell.key()}", flush=True)
        if not run_in_subprocess(cell, harness, args.threads):
            print(f"quality: {cell.key()} failed; stopping the plan", file=sys.stderr)
            return 1
    return 0


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


# --- report ---------------------------------------------------------------------------------------------

METRICS = {
    "test_nll": "test NLL",
    "test_acc": "test acc",
    "test_em": "GSM8K EM",
    "trained_recall": "recall (trained wording)",
    "test_recall": "recall (new wording)",
    "wiki_nll": "WikiText NLL",
}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(results: list[dict], bases: dict[str, dict]) -> list[dict]:
    """Per (task, budget, arm): the chosen LR, the LR curve (val NLL, seed 0) and test metrics over seeds."""
    rows = []
    groups = sorted({(r["cell"]["task"], r["cell"]["targets"], r["cell"]["budget"], r["cell"]["arm"]) for r in results})
    full_done: set[str] = set()  # full FT has no budget: one row per task, whichever targets its cells recorded
    for task, targets, budget, arm in groups:
        if arm == "full":
            if task in full_done:
                continue
            full_done.add(task)
        lr = best_lr(results, task, arm, targets, budget)
        runs = [r for r in results if _matches(r, task, arm, targets, budget)]
        at_lr = [r for r in runs if r["cell"]["lr"] == lr]
        curve = {r["cell"]["lr"]: r["metrics"]["val_nll"] for r in runs if r["cell"]["seed"] == 0}
        row = {
            "task": task,
            "budget": "dense" if arm == "full" else f"{targets}-{budget}",
            "arm": arm,
            "lr": lr,
            "seeds": len(at_lr),
            "trainable": at_lr[0]["trainable"],
            "lr_curve": dict(sorted(curve.items())),
        }
        for key in METRICS:
            row[key] = [r["metrics"][key] for r in at_lr if key in r["metrics"]]
        row["base"] = bases.get(task, {}).get("metrics", {})
        row["spread"] = _spread(at_lr[0].get("selection"))
        rows.append(row)
    return rows


def _spread(selection: dict | None) -> str:
    """Where a selection sits: modules used, and the share of blocks in its two most used input column blocks."""
    if not selection:
        return "–"
    counts = sorted(selection["column_blocks"].values(), reverse=True)
    top2 = sum(counts[:2]) / max(1, sum(counts))
    return f"{selection['modules_used']}/{selection['modules']} modules, {top2:.0%} in 2 column blocks"


def markdown(rows: list[dict]) -> str:
    lines = []
    for task in sorted({r["task"] for r in rows}):
        base = next(r["base"] for r in rows if r["task"] == task)
        keys = [k for k in METRICS if any(r[k] for r in rows if r["task"] == task)]
        untuned = ", ".join(f"{METRICS[k]} {base[k]:.4f}" for k in keys if k in base)
        header = " | ".join(["budget", "arm", "trainable", "LR (val)", "seeds", *(METRICS[k] for k in keys)])
        lines += [f"### {task}", "", f"untuned: {untuned}", "", f"| {header} | val NLL by LR (seed 0) | selection |",
                  "|---|---|---:|---:|---:|" + "---|" * len(keys) + "---|---|"]  # fmt: skip
        for r in (r for r in rows if r["task"] == task):
            curve = " · ".join(f"{lr:g}: {v:.3f}" for lr, v in r["lr_curve"].items())
            cells = " | ".join(_mean_std(r[k]) for k in keys)
            lines.append(f"| {r['budget']} | {r['arm']} | {r['trainable']:,} | {r['lr']:g} | {r['seeds']} | {cells} | "
                         f"{curve} | {r['spread']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task and r["test_nll"]]
        names = [f"{r['arm']}\n{r['budget']}" for r in mine]
        means = [statistics.mean(r["test_nll"]) for r in mine]
        stds = [statistics.stdev(r["test_nll"]) if len(r["test_nll"]) > 1 else 0 for r in mine]
        axes[0][col].barh(names, means, xerr=stds, color="tab:blue")
        axes[0][col].set_xlim(min(means) * 0.98, max(means) * 1.01)
        axes[0][col].set_title(f"{task}: test NLL at the validation-chosen LR (mean ± std)")
        for r in mine:
            curve = r["lr_curve"]
            axes[1][col].plot(list(curve), list(curve.values()), marker="o", label=f"{r['arm']} {r['budget']}")
        axes[1][col].set_xscale("log")
        axes[1][col].set_xlabel("learning rate")
        axes[1][col].set_ylabel("validation NLL (seed 0)")
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


REPORT_HEADER = """# Quality study (generated by `python scripts/quality.py report`; do not edit by hand)

SmolLM2-135M-Instruct on CPU, trained in bf16-mixed (autocast; fp32 weights and optimizer state) and evaluated
in fp32; cells trained in fp32 (`*-fp32.json`) check that precision at the end of this page. Every arm trains
100 optimizer steps of batch 8 (≤ 192 tokens) on the same batches in the same order (the data seed is the run's
seed); SMT's 5 warm-up steps are inside the 100 (gradient-free `random` needs none). Equal budget: every sparse
arm gets the trainable-weight count of LoRA of the budget's rank on the same targets (`budget` column: targets
and rank, e.g. `qkv-r8`; `trainable` column, exact); SMT blocks are 64² unless the arm says `@<side>`. AdamW, cosine
schedule to 0.1×, 3 LR warm-up steps. Each arm's LR is the seed-0 LR with the lowest *validation* NLL; test
columns are mean ± std over the seeds run at that LR. NLL = mean next-token negative log-likelihood of the
held-out responses (alpaca: 200 records; GSM8K: 200 test problems; ARC-Easy: the correct answer's text); ARC
accuracy = choice with the highest log-probability per byte (300 test questions); GSM8K exact match only where
a cell asked for it (`run --em N`); WikiText NLL = 24 fixed windows of 256 tokens of WikiText-2 test
(forgetting: compare with the untuned line). Raw results:
`docs/quality/raw/<task>/<targets>-<budget>/<arm>/seed<S>-lr<LR>.json`.

**Knowledge tasks** (`facts-N`, generated by `smt.eval.knowledge`): N facts about fictional people (home city,
job, pet, favourite sport; values paired at random), every fact trained in three question wordings for 8
epochs (`steps` = 8 · 3N / 8, batch 8), with the prompt `Question: …\nAnswer:`; the LR grid starts at 3e-3 and
the LR is chosen by the NLL of the answers asked in a validation wording never trained on. Recall = the share of
(up to 200) facts whose true value is the most likely of the attribute's 20 values (chance 0.05), asked in the
trained wording (`recall (trained wording)`: did the fact go in?) and in a test wording never trained on
(`recall (new wording)`: can the model use it?). `spread:<criterion>` is SMT with `allocation: proportional`.

"""


def precision_check(out: Path) -> str:
    """The same cells trained in fp32 and in bf16-mixed, side by side: how much the precision moves the metrics."""
    fp32 = {_same_run(r): r for r in load_results(out, "32-true")}
    pairs = [(fp32[_same_run(r)], r) for r in load_results(out, "bf16-mixed") if _same_run(r) in fp32]
    if not pairs:
        return ""
    lines = ["### precision check: the same cells trained in fp32 and in bf16-mixed", "",
             "| task | arm | LR | val NLL fp32 → bf16 | test NLL fp32 → bf16 | WikiText NLL fp32 → bf16 |",
             "|---|---|---:|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        moves = [f"{a['metrics'][k]:.4f} → {b['metrics'][k]:.4f}" for k in ("val_nll", "test_nll", "wiki_nll")]
        lines.append(f"| {a['cell']['task']} | {a['cell']['arm']} | {a['cell']['lr']:g} | " + " | ".join(moves) + " |")
    return "\n".join([*lines, ""])


def _same_run(record: dict) -> tuple:
    c = record["cell"]
    return c["task"], c["arm"], c["lr"], c["seed"], c["targets"], c["budget"], c["steps"]


def report(harness: Harness, out_md: Path) -> str:
    results = load_results(harness.out, harness.precision)
    bases = {p.parent.name: json.loads(p.read_text()) for p in harness.out.glob("*/base.json")}
    rows = summarize(results, bases)
    text = markdown(rows) + "\n" + precision_check(harness.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(REPORT_HEADER + text)
    if rows:
        plot(rows, out_md.with_suffix(".png"))
    (out_md.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    return text


# --- command line -----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("run", "study", "report"), default="report")
    parser.add_argument("--task", default="alpaca", type=task_name, help="alpaca, gsm8k, arc_easy or facts-N")
    parser.add_argument("--tasks", nargs="+", default=["alpaca"], type=task_name)
    parser.add_argument("--arm", default="smt:grad_sq")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per headline arm (study)")
    parser.add_argument("--targets", default="qkv", choices=list(TARGETS))
    parser.add_argument("--budget", default="r8", help="r<rank>: LoRA rank whose weight count every arm gets")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100; facts-N: --epochs)")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="facts-N: passes over the training records")
    parser.add_argument("--em", type=int, default=0, help="GSM8K test questions for greedy exact match (0 = off)")
    parser.add_argument("--plan", default="sweep", choices=list(PLANS))
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0 = torch's default; 1 is "
        "faster on a CPU shared with other jobs: spinning threads waste what the others need)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16-mixed", "32-true"),
        help="training precision (auto: bf16-mixed where the CPU has native bf16, else 32-true)",
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny random model, generated data, all arms")
    parser.add_argument("--tiny-model", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def tiny(out: Path, precision: str) -> int:
    """Every arm kind on a tiny random model and generated data, then the report: what CI runs."""
    harness = Harness.tiny(out)
    harness.precision = precision
    write_tiny_data(harness.data_root)
    for task in (*TASKS, "facts-8"):
        _write(harness.out / task / "base.json", run_base(task, harness))
    cells = [
        ("alpaca", arm)
        for arm in ("full", "lora", "smt:grad_sq", "smt:grad_sq@8", "smt:grad_snr", "strips:random", "regrow:grad_snr")
    ]
    cells += [("gsm8k", "smt:grad_snr"), ("arc_easy", "lora"), ("facts-8", "spread:grad_sq"), ("facts-8", "rslora")]
    for task, arm in cells:
        lr = 1e-3 if arm == "full" else 1e-2
        cell = Cell(task, arm, lr, steps=6, batch_size=4, warmup=2, block_size=16, em=4 if task == "gsm8k" else 0,
                    precision=harness.precision)  # fmt: skip
        _write(result_path(cell, harness), run_cell(cell, harness))
    print(report(harness, out / "quality.md"))
    return 0


def resolve_precision(choice: str) -> str:
    """``auto`` → bf16-mixed where this CPU multiplies bf16 natively (AVX512-BF16 or AMX), else fp32: on AVX2-only
    CPUs bf16 is 30–50× slower. Results are cached per precision, so the two never mix in one table."""
    if choice != "auto":
        return choice
    from smt.kernels import cpu_bf16_is_fast

    return "bf16-mixed" if cpu_bf16_is_fast() else "32-true"


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.tiny:
        return tiny(args.out or Path("runs/quality-tiny"), resolve_precision(args.precision))
    harness = Harness.tiny(args.out.parent) if args.tiny_model else Harness()
    harness.precision = resolve_precision(args.precision)
    if args.out is not None:
        harness.out = args.out
    if args.command == "run":
        steps = task_steps(args.task, args.steps, args.epochs)
        cell = Cell(args.task, args.arm, args.lr, args.seed, args.targets, args.budget, steps, em=args.em,
                    precision=harness.precision)  # fmt: skip
        _write(result_path(cell, harness), run_cell(cell, harness))
        return 0
    if args.command == "study":
        return study(args, harness)
    print(report(harness, ROOT / "docs" / "quality.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

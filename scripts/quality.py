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
- ``commonsense``: the long instruction run: 1,000 steps of 4 records (``--steps`` overrides) on the train
  splits of BoolQ (question only, as LLM-Adapters ships it; true/false), ARC-Easy, ARC-Challenge and OpenBookQA
  mixed, the answer text as the response; accuracy as for ``arc_easy`` on 50 test questions of each set
  (``test_acc_<set>``) and over all 200 (``test_acc``).
- ``code``: continued pretraining on the Python source of the installed ``lightning`` package (Apache-2.0, pinned),
  split by module (held-out modules are never trained on), plain text with the loss on every token, long files
  windowed by the data module (``template: text``); held-out NLL over fixed windows of the val/test modules.
- ``facts-N`` (generated, ``smt.eval.knowledge``): N facts about fictional people, trained in three question
  wordings for ``--epochs``; recall (the true value ranked first of the attribute's 20) in the trained wording and
  in two never-trained ones (``val_recall``, ``test_recall``); NLL of the answers asked in the held-out wordings.
Every run also reports forgetting: WikiText-2 NLL (fixed windows of its test split) after tuning.

Arms (``--arm``): ``full``, ``lora``, ``rslora`` (LoRA scaled by α/√r), ``smt:<criterion>`` (64² blocks, the best
blocks anywhere; ``smt:<criterion>@32`` for 32² blocks), ``spread:<criterion>`` (SMT with
``allocation=proportional``: each module's share of the budget by its size, its best blocks by the criterion),
``strips:<criterion>`` (whole output rows, S²FT-style), ``regrow:<criterion>`` (SMT + SpIEL-style AG regrowth),
``warm:<criterion>`` (the paper's warm-up, ``smt.warmup_updates=full``: every weight trains for the warm-up's steps
at ``WARM_LR``, then the blocks from the warmed weights; compare with ``smt:<criterion>``, whose warm-up steps
update nothing, over the same steps and batches: the warm arm makes ``warmup`` more optimizer updates).
Budgets: ``r8`` / ``r32`` = as many trainable weights as LoRA of that rank on the same targets (counted exactly
and reported); targets ``qkv``, ``v``, ``all`` (every linear layer of the decoder). Every arm trains ``--steps``
optimizer steps on the same batches in the same order (the data seed is the run's seed); SMT's warm-up steps are
inside that budget. The LR follows the study's schedule (3 warm-up steps, cosine down to 0.1×) unless
``--schedule constant`` (plain AdamW; ``study --plan user-lr`` runs LoRA and SMT over 1e-4 … 3e-3 that way).

Results: one JSON per (task, targets, budget, arm, seed, lr) under ``--out`` (default ``docs/quality/raw``), so a
long study accumulates across runs and sessions; ``report`` picks each arm's LR by validation NLL (seed 0),
then reports test metrics at that LR as mean ± std over the seeds present.

Beside this file: ``quality_tasks.py`` (cells, harness, task records), ``quality_report.py`` (results, report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from harness import StepClock, arm_callbacks, cpu_trainer, language_model
from quality_lr import USER_GRID
from quality_report import best_lr, load_results, matches_arm, report
from quality_tasks import (
    CHOICE_TASKS,
    DEFAULT_OUT,
    EPOCHS,
    ROOT,
    TARGETS,
    TASKS,
    Cell,
    Harness,
    is_knowledge_task,
    task_name,
    task_splits,
    task_steps,
    task_template,
    text_windows,
    wikitext_windows,
    write_tiny_data,
)

from smt.eval.heldout import choice_accuracy, exact_match, response_nll, text_nll

# --- evaluation ---------------------------------------------------------------------------------------


def evaluate(model, tokenizer, splits: dict, cell: Cell, harness: Harness, windows: list[list[int]]) -> dict:
    """Every metric of one trained (or untuned) model, in eval mode."""
    model.eval()
    template = task_template(cell.task)
    if template == "text":  # continued pretraining: held-out source windows instead of responses
        return {split + "_nll": text_nll(model, text_windows(tokenizer, splits[split], harness.max_length, count))
                for split, count in (("val", harness.n_val // 2), ("test", harness.n_test // 2))} | {
                "wiki_nll": text_nll(model, windows)}  # fmt: skip
    metrics = {
        "val_nll": response_nll(model, tokenizer, splits["val"], harness.max_length, template=template),
        "test_nll": response_nll(model, tokenizer, splits["test"], harness.max_length, template=template),
        "wiki_nll": text_nll(model, windows),
    }
    if cell.task in CHOICE_TASKS:
        metrics["val_acc"] = choice_accuracy(model, tokenizer, splits["val"])
        metrics |= test_accuracy(model, tokenizer, splits["test"])
    if cell.task == "gsm8k" and cell.em:
        metrics["test_em"] = exact_match(model, tokenizer, splits["test"][: cell.em])
    if is_knowledge_task(cell.task):
        metrics["trained_nll"] = response_nll(model, tokenizer, splits["trained"], harness.max_length,
                                              template=template)  # fmt: skip
        for split in ("trained", "val", "test"):
            metrics[f"{split}_recall"] = fact_recall(model, tokenizer, splits[split], template)
    return metrics


def test_accuracy(model, tokenizer, records: list[dict]) -> dict:
    """``test_acc`` over every test question, and ``test_acc_<set>`` per source set where the task mixes sets."""
    sources = sorted({r["source"] for r in records if "source" in r})
    if not sources:
        return {"test_acc": choice_accuracy(model, tokenizer, records)}
    per_set = {s: [r for r in records if r.get("source") == s] for s in sources}
    metrics = {f"test_acc_{s}": choice_accuracy(model, tokenizer, rows) for s, rows in per_set.items()}
    metrics["test_acc"] = sum(metrics[f"test_acc_{s}"] * len(rows) for s, rows in per_set.items()) / len(records)
    return metrics


def fact_recall(model, tokenizer, records: list[dict], template: str) -> float:
    """Share of facts whose true value is the most likely of all the attribute's values (``smt.eval.recall``)."""
    from smt.data.prompts import adds_special_tokens, render_prompt, render_response
    from smt.eval.recall import recall

    prompts = [render_prompt(template, r["instruction"]) for r in records]
    prefixes = [render_response(template, r["context"]) for r in records]
    return recall(model, tokenizer, prompts, prefixes, [r["choices"] for r in records], [r["label"] for r in records],
                  special_tokens=adds_special_tokens(template))  # fmt: skip


# --- methods ------------------------------------------------------------------------------------------


SCHEDULES = {
    "cosine": {"scheduler": "cosine", "lr_warmup_steps": 3, "min_lr_ratio": 0.1},
    "constant": {"scheduler": "constant", "lr_warmup_steps": 0, "min_lr_ratio": 1.0},
}
"""``Cell.schedule`` → the LightningModule's LR schedule."""


def build_module(cell: Cell, harness: Harness):
    """The LightningModule and callbacks of one arm, from the same seed and weights, at LoRA ``cell.budget``'s size."""
    from smt.core.config import RegrowthConfig

    module = language_model(harness.model, harness.model_config, harness.tokenizer, cell.seed, lr=cell.lr,
                            **SCHEDULES[cell.schedule])  # fmt: skip
    kind, _, criterion = cell.arm.partition(":")
    criterion, _, side = criterion.partition("@")  # "grad_sq@32": 32² blocks instead of the cell's default
    rank, targets = int(cell.budget.removeprefix("r")), TARGETS[cell.targets]
    if kind in ("full", "lora", "rslora"):
        return module, arm_callbacks(module, kind, targets, rank)
    block = (1, -1) if kind == "strips" else int(side) if side else cell.block_size
    regrowth = RegrowthConfig(every=20, accumulate=5, rate=0.2, criterion="ag") if kind == "regrow" else None
    warmup = arm_warmup(cell)
    allocation = "proportional" if kind == "spread" else "global"
    dense = {"warmup_updates": "full", "warmup_lr": WARM_LR} if kind == "warm" else {}
    return module, arm_callbacks(module, "smt", targets, rank, block_size=block, warmup_steps=warmup,
                                 criterion=criterion, regrowth=regrowth, seed=cell.seed,
                                 allocation=allocation, **dense)  # fmt: skip


def arm_warmup(cell: Cell) -> int:
    """Optimizer steps the arm spends before its trained weights first update: SMT's warm-up (a criterion that
    needs gradients, or the dense ``warm:`` warm-up); 0 for full FT, LoRA and gradient-free selections."""
    from smt.core.scoring import get_criterion

    kind, _, criterion = cell.arm.partition(":")
    if kind in ("full", "lora", "rslora"):
        return 0
    return cell.warmup if get_criterion(criterion.partition("@")[0]).needs_gradients or kind == "warm" else 0


def total_steps(cell: Cell) -> int:
    """Optimizer steps of the whole run: ``cell.steps``, plus the arm's warm-up when it comes on top."""
    return cell.steps + (arm_warmup(cell) if cell.warmup_on_top else 0)


class LossCurve(StepClock):
    """The step clock, printing the mean loss of every 10 steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if len(self.losses) % 10 == 0:
            print(f"quality: step {len(self.losses)} loss {statistics.mean(self.losses[-10:]):.4f}", flush=True)


def train(cell: Cell, harness: Harness, splits: dict, module, callbacks: list) -> dict:
    """Fit the cell's optimizer steps (:func:`total_steps`) on the training split; the loss curve and wall time."""
    from smt.lightning.datamodule import InstructionDataModule

    path = harness.work / "splits" / cell.task / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ("text",) if task_template(cell.task) == "text" else ("instruction", "input", "output", "answer")
    path.write_text(json.dumps([{k: r[k] for k in fields} for r in splits["train"]]))
    data = InstructionDataModule(train_path=str(path), batch_size=cell.batch_size, max_length=harness.max_length,
                                 limit_train=total_steps(cell) * cell.batch_size, seed=cell.seed,
                                 template=task_template(cell.task), cache_dir=str(harness.work / "cache"))  # fmt: skip
    data.set_tokenizer(module.tokenizer)
    curve = LossCurve()
    trainer = cpu_trainer(
        total_steps(cell), [*callbacks, curve], cell.precision, accelerator="cpu", limit_val_batches=0
    )
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

WARM_LR = 1e-4
"""LR of the ``warm:`` arm's dense warm-up (the first of full FT's grid; the paper used 9.65e-6 on 7B models)."""
LR_GRID = {"full": [1e-4, 3e-4, 3e-5], "default": [1e-3, 3e-3, 3e-4], "facts": [3e-3, 1e-3, 1e-2]}
"""Seed-0 learning rates per arm, tried in this order (the middle first, so an early stop still compares arms)."""
HEADLINE = ["lora", "smt:grad_sq", "smt:random", "smt:grad_snr", "full"]
PLANS = {
    "sweep": [*HEADLINE[:4], "smt:grad_sq_xnorm", "full"],
    "headline": HEADLINE,
    "core": HEADLINE[:4],  # the arms the targets compare: LoRA, SMT's two candidate defaults, random blocks
    "structure": ["strips:random", "strips:grad_snr", "regrow:grad_snr"],
    # where sparse capacity should matter (facts-N): the default, its per-module spread, random blocks, the ceiling
    "capacity": ["lora", "smt:grad_sq", "spread:grad_sq", "smt:random", "full"],
    "capacity-sparse": ["lora", "smt:grad_sq", "spread:grad_sq", "smt:random"],  # full FT has no budget to vary
    "spread": ["spread:grad_sq"],
    "warmup": ["smt:grad_sq", "warm:grad_sq"],  # the paper's dense warm-up against score-only, same steps
    "budget": ["lora", "rslora", "smt:grad_sq"],  # larger budgets (--budget r64): rsLoRA is LoRA's strongest there
    "user-lr": ["lora", "smt:grad_sq"],  # every LR of a user's grid (USER_GRID), no search: issue 24's target
}


def exact_match_questions(task: str) -> int:
    """GSM8K test questions answered by greedy generation in the study's cells: none. At this scale (135M, 100
    steps) exact match sits at 2–3 % for the untuned model and LoRA alike (3/100, 2/100), so it ranks nothing,
    while 100 greedy generations cost as much as the training (~7 min on one core). ``run --em N`` still
    measures it for one cell."""
    return 0


def result_path(cell: Cell, harness: Harness) -> Path:
    return harness.out / cell.key()


def sweep_cells(results: list[dict], task: str, arm: str, targets: str, budget: str, steps: int,
                precision: str = "bf16-mixed") -> list[Cell]:  # fmt: skip
    """The next seed-0 LRs to try: the grid, then one step (×3) beyond an edge that is still the best."""
    grid = LR_GRID.get(arm, LR_GRID["default"])
    if is_knowledge_task(task) and arm != "full":
        grid = LR_GRID["facts"]  # storing facts wants larger steps than format learning: start one ×3 higher
    done = {r["cell"]["lr"] for r in results if matches_arm(r, task, arm, targets, budget) and r["cell"]["seed"] == 0}
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
               epochs: float = 8, schedule: str = "cosine"):  # fmt: skip
    """The plan's missing cells, one at a time: the LR sweeps round-robin over the arms (each next LR depends on
    what the earlier ones found), then the extra seeds of every arm at its chosen LR. ``user-lr`` instead runs
    every LR of the user grid once (seed 0) under ``schedule``; the other plans train with the study's cosine."""
    arms, requested = PLANS[plan], steps
    for task in tasks:
        steps = task_steps(task, requested, epochs)
        if plan == "user-lr":
            for lr in USER_GRID:
                yield from (Cell(task, arm, lr, 0, targets, budget, steps, precision=harness.precision,
                                 schedule=schedule) for arm in arms)  # fmt: skip
            continue
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
            "--em", str(cell.em), "--out", str(harness.out), "--precision", cell.precision,
            "--schedule", cell.schedule]  # fmt: skip
    if harness.model_config is not None:
        args.append("--tiny-model")
    if threads:
        args += ["--threads", str(threads)]
    subprocess.run(args, check=False)
    return result_path(cell, harness).is_file()


def ensure_base(task: str, harness: Harness) -> None:
    """The untuned model's metrics on ``task`` (the report's reference line), measured once per results folder."""
    base = harness.out / task / "base.json"
    if not base.is_file():
        _write(base, run_base(task, harness))


def study(args, harness: Harness) -> int:
    if args.schedule != "cosine" and args.plan != "user-lr":
        sys.exit(f"quality: --schedule {args.schedule} runs only with --plan user-lr (the other plans' LR searches "
                 "and tables are the cosine study's); drop --schedule or use --plan user-lr")  # fmt: skip
    for task in args.tasks:
        ensure_base(task, harness)
    for cell in next_cells(args.plan, args.tasks, args.targets, args.budget, args.seeds, args.steps, harness,
                           args.epochs, args.schedule):  # fmt: skip
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


# --- command line -----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("run", "study", "report"), default="report")
    parser.add_argument("--task", default="alpaca", type=task_name,
                        help="alpaca, gsm8k, arc_easy, commonsense, code or facts-N")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=["alpaca"], type=task_name)
    parser.add_argument("--arm", default="smt:grad_sq")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per headline arm (study)")
    parser.add_argument("--targets", default="qkv", choices=list(TARGETS))
    parser.add_argument("--budget", default="r8", help="r<rank>: LoRA rank whose weight count every arm gets")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100; facts-N: --epochs)")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="facts-N: passes over the training records")
    parser.add_argument(
        "--warmup-on-top",
        action="store_true",
        help="SMT's warm-up steps on top of --steps (every arm makes --steps updates) instead of inside",
    )
    parser.add_argument(
        "--schedule",
        default="cosine",
        choices=list(SCHEDULES),
        help="LR schedule: cosine (3 warm-up steps, down to 0.1x; the study's) or constant (plain AdamW)",
    )
    parser.add_argument("--em", type=int, default=0, help="GSM8K test questions for greedy exact match (0 = off)")
    parser.add_argument("--plan", default="sweep", choices=list(PLANS))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {DEFAULT_OUT}; report: docs/quality.md for the default, else <out>/quality.md)",
    )
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
    cells += [("alpaca", "warm:grad_sq")]  # the paper's dense warm-up
    cells += [
        ("gsm8k", "smt:grad_snr"),
        ("arc_easy", "lora"),
        ("commonsense", "smt:grad_sq"),
        ("facts-8", "spread:grad_sq"),
        ("facts-8", "rslora"),
        ("code", "smt:grad_sq"),
    ]
    cells += [("arc_easy", "smt:grad_sq")]  # plain AdamW: no LR schedule
    on_top = {("gsm8k", "smt:grad_snr")}  # its warm-up comes on top of the 6 updates
    constant = {("arc_easy", "smt:grad_sq")}
    for task, arm in cells:
        lr = 1e-3 if arm == "full" else 1e-2
        cell = Cell(task, arm, lr, steps=6, batch_size=4, warmup=2, block_size=16, em=4 if task == "gsm8k" else 0,
                    precision=harness.precision, warmup_on_top=(task, arm) in on_top,
                    schedule="constant" if (task, arm) in constant else "cosine")  # fmt: skip
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
                    precision=harness.precision, warmup_on_top=args.warmup_on_top, schedule=args.schedule)  # fmt: skip
        ensure_base(args.task, harness)
        _write(result_path(cell, harness), run_cell(cell, harness))
        return 0
    if args.command == "study":
        return study(args, harness)
    # The study's own results make docs/quality.md; results kept elsewhere (--out) get their report beside them.
    if args.out is None and args.precision == "auto":
        harness.precision = "bf16-mixed"  # what docs/quality.md's tables describe, whatever this CPU trains in
    print(report(harness, ROOT / "docs" / "quality.md" if args.out is None else args.out / "quality.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

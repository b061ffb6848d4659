"""Fixtures of the integration tests: a small instruction data file and the repository's paths.

Every test that runs the CLI changes into a temporary folder first, so nothing lands in the repository
(``configs/debug.yaml`` writes to ``runs/debug`` relative to the working directory).
"""

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"


def write_arithmetic_records(path: Path, count: int = 40, seed: int = 0) -> Path:
    """LLM-Adapters-style records (instruction/input/output/answer) of one-digit sums."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question, output = f"What is {a} plus {b}?", f"The answer is {a + b}."
        records.append({"instruction": question, "input": "", "output": output, "answer": str(a + b)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    """40 records: with ``configs/debug.yaml`` (val_split 8, batch 4) that is 8 training batches per epoch."""
    return write_arithmetic_records(tmp_path_factory.mktemp("data") / "train.json")


@pytest.fixture(scope="session")
def pretrained_folder(tmp_path_factory) -> Path:
    """A tiny random Llama of ``configs/debug*.yaml``'s shape written with ``save_pretrained`` (a folder base)."""
    from helpers import tiny_llama

    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama(layers=2, hidden=64, vocab=384).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Relative outputs (``runs/``, ``checkpoints/``, ``lightning_logs/``) land in the test's folder."""
    monkeypatch.chdir(tmp_path)

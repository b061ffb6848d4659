"""``scripts/benchmark.py --tiny``: every method runs on the same harness and the report holds what it promises.

The numbers of a one-minute run on a tiny random model say nothing about the methods; this test checks
the harness: equal trainable budgets for SMT and LoRA, SMT freezing what it should, ratios computed
against the right rows, files written, and training having happened (losses fall).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import import_script


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    benchmark = import_script("benchmark")
    out = tmp_path_factory.mktemp("bench")
    assert benchmark.main(["--tiny", "--out", str(out)]) == 0
    return out, json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text()


def test_every_method_is_measured_and_written(report):
    out, data, markdown = report
    names = [r["method"] for r in data["results"]]
    assert names == ["base (untuned)", "full", "lora", "smt", "smt+regrowth"]
    assert (out / "benchmark.png").stat().st_size > 10_000
    for row in names:
        assert f"| {row} |" in markdown
    for result in data["results"][1:]:
        assert len(result["times"]) == data["setup"]["steps"] == len(result["losses"])
        assert result["step_s"] > 0 and result["peak_mb"] > 0 and math.isfinite(result["val_loss"])
        assert 0.0 <= result["accuracy"] <= 1.0


def test_smt_and_lora_train_the_same_number_of_weights(report):
    _, data, _ = report
    by_name = {r["method"]: r for r in data["results"]}
    block = data["setup"]["block_size"] ** 2
    assert abs(by_name["smt"]["trainable"] - by_name["lora"]["trainable"]) <= block / 2
    assert by_name["smt"]["trainable"] == by_name["smt+regrowth"]["trainable"]
    assert by_name["full"]["trainable"] == by_name["full"]["total"]
    assert by_name["smt"]["trainable"] < 0.05 * by_name["full"]["trainable"]


def test_warmup_share_is_smt_only_and_training_lowers_the_loss(report):
    _, data, _ = report
    by_name = {r["method"]: r for r in data["results"]}
    assert by_name["full"]["warmup_share"] == by_name["lora"]["warmup_share"] == 0.0
    assert 0.0 < by_name["smt"]["warmup_share"] < 1.0
    base = by_name["base (untuned)"]["val_loss"]
    for name in ("full", "lora", "smt", "smt+regrowth"):
        assert by_name[name]["val_loss"] < base, name


def test_without_shared_data_a_generated_boolq_style_task_is_written_and_named(tmp_path, monkeypatch):
    benchmark = import_script("benchmark")
    monkeypatch.setattr(benchmark, "DATA", tmp_path / "no-shared-data")
    setup = benchmark.Setup.tiny()
    said = benchmark.resolve_data(setup, tmp_path)
    assert setup.task == "boolq" and "generated" in said
    train, test = (json.loads(Path(getattr(setup, f"{split}_path")).read_text()) for split in ("train", "test"))
    assert len(train) == 1170 and len(test) == 390
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    for row in train + test:
        a, b = (int(n) for n in row["instruction"].split("is ")[1].split("?")[0].split(" greater than "))
        assert row["answer"] == str(a > b).lower() and row["output"].endswith(row["answer"])

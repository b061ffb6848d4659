"""``scripts/quality.py --tiny``: every arm kind runs, budgets match, results are cached and reported.

A tiny random model says nothing about the methods; this checks the harness: equal trainable budgets
across LoRA / SMT / strips, training happened (losses fall, held-out NLL below the untuned model's),
the LR choice uses validation NLL only, and the study's sweep extends past a grid edge that still wins.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import import_script


@pytest.fixture(scope="module")
def quality():
    return import_script("quality")


@pytest.fixture(scope="module")
def tiny_run(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    assert quality.main(["--tiny", "--out", str(out)]) == 0
    return out, quality.load_results(out / "raw"), (out / "quality.md").read_text()


def test_every_arm_trains_at_the_same_budget(tiny_run):
    out, results, markdown = tiny_run
    alpaca = {r["cell"]["arm"]: r for r in results if r["cell"]["task"] == "alpaca"}
    arms = {"full", "lora", "smt:grad_sq", "smt:grad_sq@8", "smt:grad_snr", "strips:random", "regrow:grad_snr",
            "warm:grad_sq"}  # fmt: skip
    assert set(alpaca) == arms
    budget = alpaca["lora"]["trainable"]
    for arm in ("smt:grad_sq", "smt:grad_sq@8", "smt:grad_snr", "regrow:grad_snr", "warm:grad_sq"):
        assert alpaca[arm]["trainable"] == budget  # 16² blocks divide LoRA's count exactly on this model
    assert abs(alpaca["strips:random"]["trainable"] - budget) <= 64  # whole rows of 64 weights
    assert alpaca["full"]["trainable"] > 10 * budget
    base = json.loads((out / "raw" / "alpaca" / "base.json").read_text())["metrics"]
    for arm, record in alpaca.items():
        assert record["steps"] == 6 and len(record["losses"]) == 6
        assert record["metrics"]["test_nll"] < base["test_nll"], arm
        assert f"| {arm} |" in markdown
    assert alpaca["smt:grad_sq"]["selection"]["blocks"] == budget // 256
    assert alpaca["smt:grad_sq@8"]["selection"]["blocks"] == budget // 64  # the arm's own block side


def test_results_are_cached_per_training_precision(tiny_run, quality):
    out, results, _ = tiny_run
    precision = results[0]["cell"]["precision"]
    assert precision == quality.resolve_precision("auto") and {r["cell"]["precision"] for r in results} == {precision}
    other = "32-true" if precision == "bf16-mixed" else "bf16-mixed"
    assert quality.load_results(out / "raw", other) == []  # a study at the other precision starts afresh
    lora = quality.Cell("alpaca", "lora", 1e-3)
    assert lora.key() != quality.Cell("alpaca", "lora", 1e-3, precision="32-true").key()


def test_warmup_on_top_gives_smt_as_many_updates_as_lora(tiny_run, quality):
    _, results, markdown = tiny_run
    (gsm8k,) = [r for r in results if r["cell"]["task"] == "gsm8k"]
    assert gsm8k["cell"]["warmup_on_top"] and gsm8k["steps"] == 6 + 2 and len(gsm8k["losses"]) == 8
    assert "| smt:grad_snr +warm-up |" in markdown
    inside = quality.Cell("gsm8k", "smt:grad_snr", 1e-2)
    assert quality.total_steps(inside) == 100 and inside.key() != replace(inside, warmup_on_top=True).key()
    assert quality.total_steps(quality.Cell("gsm8k", "lora", 1e-2, warmup_on_top=True)) == 100  # nothing to add


def test_task_specific_metrics_are_reported(tiny_run):
    _, results, markdown = tiny_run
    by_task = {r["cell"]["task"]: r["metrics"] for r in results}
    assert 0.0 <= by_task["arc_easy"]["test_acc"] <= 1.0 and "test_em" in by_task["gsm8k"]
    assert "### arc_easy" in markdown and "test acc" in markdown and "GSM8K EM" in markdown
    facts = {r["cell"]["arm"]: r for r in results if r["cell"]["task"] == "facts-8"}
    assert set(facts) == {"spread:grad_sq", "rslora"}
    for split in ("trained", "val", "test"):
        assert 0.0 <= facts["rslora"]["metrics"][f"{split}_recall"] <= 1.0
    spread = facts["spread:grad_sq"]["selection"]
    assert spread["modules_used"] == spread["modules"]  # proportional: every module gets its share
    assert facts["spread:grad_sq"]["trainable"] == facts["rslora"]["trainable"]
    assert "### facts-8" in markdown and "recall (new wording)" in markdown


def test_continued_pretraining_task_learns(tiny_run):
    out, results, markdown = tiny_run
    code = next(r for r in results if r["cell"]["task"] == "code")
    base = json.loads((out / "raw" / "code" / "base.json").read_text())["metrics"]
    assert set(code["metrics"]) == {"val_nll", "test_nll", "wiki_nll"}
    assert code["metrics"]["test_nll"] < base["test_nll"]  # held-out modules' text got likelier
    assert "### code" in markdown


def test_learn_vs_forget_lists_every_lr_and_names_the_points_that_beat_each(quality, tmp_path):
    frontier = import_script("quality_frontier")

    def run(arm, lr, test, wiki, seed=0, targets="all", **cell):
        record = vars(quality.Cell("facts-80", arm, lr, seed, targets=targets))
        return {"cell": {**record, **cell}, "metrics": {"test_nll": test, "wiki_nll": wiki, "test_recall": 1.0}}

    records = [
        run("lora", 1e-3, 0.012, 4.0),
        run("lora", 3e-3, 0.005, 4.7),
        run("lora", 3e-3, 0.007, 4.5, seed=1),
        run("spread:grad_sq", 3e-3, 0.013, 4.2),
        run("full", 1e-4, 0.03, 3.7, targets="qkv"),
        run("smt:grad_sq", 3e-3, 0.001, 3.0, schedule="constant"),  # another regime: not on this frontier
        run("smt:random", 3e-3, 0.5, 3.0, targets="qkv"),  # another budget, one arm: no frontier there
    ]
    groups = frontier.frontiers(records)
    assert list(groups) == [("facts-80", "all-r8")]
    assert set(groups[("facts-80", "all-r8")]) == {"lora", "spread:grad_sq", "full"}  # full FT: every budget's
    assert frontier.beaten_by(groups[("facts-80", "all-r8")], "spread:grad_sq", 3e-3) == ["lora (0.001)"]
    table = frontier.frontier_markdown(records)
    assert "| lora | 0.003 | 2 | 0.006 ± 0.001 | 1.000 ± 0.000 | 4.600 ± 0.141 | – |" in table
    assert "| spread:grad_sq | 0.003 | 1 | 0.013 | 1.000 | 4.200 | lora (0.001) |" in table
    assert frontier.plot_frontier(records, "facts-80", {"test_nll": 1.7, "wiki_nll": 3.5}, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert not frontier.plot_frontier(records, "code", {}, tmp_path / "c.png")


def test_code_files_split_by_module_disjointly():
    tasks = import_script("quality_tasks")
    files = tasks.code_files("json")  # a small standard-library package: the same split logic as lightning's
    assert files["train"] and not set(files["train"]) & set(files["test"] + files["val"])


def test_capacity_curve_needs_three_sizes_and_tabulates_recall(quality):
    report = import_script("quality_report")

    def row(size, arm, recall):
        return {"task": f"facts-{size}", "budget": "qkv-r8", "arm": arm, "test_recall": [recall],
                "trained_recall": [1.0], "wiki_nll": [3.5]}  # fmt: skip

    rows = [row(n, "lora", 1.0) for n in (8, 16, 32)] + [row(n, "smt:grad_sq", 0.5) for n in (8, 16)]
    curves = report.capacity_curves(rows)
    assert list(curves) == [("qkv-r8", "lora")] and list(curves[("qkv-r8", "lora")]) == [8, 16, 32]
    table = report.capacity_markdown(curves)
    assert "| qkv-r8 | lora | 1.000 (1.000), wiki 3.50 |" in table and "N=32" in table


def test_lr_is_chosen_on_validation_and_the_sweep_extends_past_a_winning_edge(quality):
    def run(lr, val, test):
        cell = quality.Cell("alpaca", "lora", lr)
        return {"cell": vars(cell), "metrics": {"val_nll": val, "test_nll": test}, "trainable": 1}

    results = [run(3e-4, 2.0, 1.0), run(1e-3, 1.9, 3.0), run(3e-3, 1.8, 3.0)]
    assert quality.best_lr(results, "alpaca", "lora", "qkv", "r8") == 3e-3  # test NLL is never looked at
    extend = quality.sweep_cells(results, "alpaca", "lora", "qkv", "r8", steps=100)
    assert [c.lr for c in extend] == [pytest.approx(9e-3)]
    results.append(run(9e-3, 1.85, 1.0))
    assert quality.sweep_cells(results, "alpaca", "lora", "qkv", "r8", steps=100) == []


def test_arc_records_keep_the_answer_text_and_the_choices():
    row = {"instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice "
           "Answer2: steam Answer3: rock\n\nAnswer format: answer1/answer2/answer3", "answer": "answer2"}  # fmt: skip
    record = import_script("quality_tasks").arc_record(row)
    assert record["instruction"] == "Which is a gas?" and record["output"] == "steam"
    assert record["choices"] == ["ice", "steam", "rock"] and record["label"] == 1


def test_boolq_records_ask_true_or_false():
    tasks = import_script("quality_tasks")
    row = {"instruction": tasks.BOOLQ_PREFIX + "is the sky blue?\n\nAnswer format: true/false", "answer": "false"}
    record = tasks.boolq_record(row)
    assert record["instruction"] == "True or false: is the sky blue?" and record["output"] == "false"
    assert record["choices"] == ["true", "false"] and record["label"] == 1


def test_commonsense_mixes_four_sets_and_scores_each(tiny_run, quality, tmp_path):
    _, results, markdown = tiny_run
    (record,) = [r for r in results if r["cell"]["task"] == "commonsense"]
    per_set = [record["metrics"][f"test_acc_{name}"] for name in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")]
    assert record["metrics"]["test_acc"] == pytest.approx(sum(per_set) / 4)  # equal test questions per set
    assert "### commonsense" in markdown and "| boolq acc |" in markdown
    harness = quality.Harness.tiny(tmp_path)
    quality.write_tiny_data(harness.data_root)
    splits = quality.task_splits("commonsense", harness)
    sources = [r["source"] for r in splits["test"]]
    assert {name: sources.count(name) for name in set(sources)} == dict.fromkeys(
        ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"), harness.n_commonsense_test
    )
    assert {r["source"] for r in splits["train"]} == set(sources) and len(splits["val"]) == harness.n_val
    assert quality.task_steps("commonsense", None, 8) == 1000 and quality.task_steps("commonsense", 20, 8) == 20
    assert quality.Cell("commonsense", "lora", 1e-3).batch_size == 4  # the task's own; others keep 8
    assert quality.Cell("alpaca", "lora", 1e-3).batch_size == 8


def test_the_lr_section_sets_smts_curve_beside_loras_and_prices_keeping_loras_lr(quality):
    section = import_script("quality_lr")

    def run(arm, lr, val, precision="32-true", seed=0):
        cell = vars(quality.Cell("facts-20", arm, lr, seed, precision=precision))
        return {"cell": cell, "metrics": {"val_nll": val}, "selection": {"blocks": 158} if arm != "lora" else None}

    grid = (1e-4, 3e-4, 1e-3, 3e-3)
    records = [run("lora", lr, val) for lr, val in zip(grid, (1.0, 0.5, 0.2, 0.1))]
    records += [run("smt:grad_sq", lr, val) for lr, val in zip(grid, (0.9, 0.6, 0.15, 0.3))]
    records += [run("smt:grad_sq", 1e-3, 0.25, seed=1), run("lora", 1e-3, 0.1, precision="bf16-mixed")]
    (key,) = section.lr_curves(records)  # bf16 has one LoRA LR only, seed 1 is not a curve point
    assert key == ("32-true", "facts-20", "qkv-r8", "cosine")
    table = section.lr_markdown(records)
    assert "| 0.300 (+0.150) | 1.000 / 0.900 | – | val NLL 0.100 (1) | val NLL 0.200 ± 0.071 (2) |" in table
    assert "| 0.003 / 0.001 | 0.300 (+0.150) |" in table and "| cosine | facts-20 | qkv-r8 | global | 158 |" in table
    assert section.lr_markdown(records[:5]) == ""  # SMT with one LR: no curve to compare
    # the proportional allocation, where swept, gets a row of its own beside the same LoRA curve
    spread = [run("spread:grad_sq", lr, val) for lr, val in zip(grid, (0.95, 0.4, 0.12, 0.2))]
    rows = [line for line in section.lr_markdown(records + spread).splitlines() if "| cosine | facts-20 |" in line]
    assert len(rows) == 2 and "| global |" in rows[0] and "| proportional |" in rows[1]
    assert "| 0.003 / 0.001 | 0.200 (+0.080) | 1.000 / 0.950 |" in rows[1]
    assert section.lr_markdown(records + spread[:2]) == table  # two LRs: no proportional row

    # a plain-AdamW sweep is its own row, with the worst accuracy where the task measures one
    constant = []
    for arm, accs in (("lora", (0.50, 0.60, 0.62, 0.61)), ("smt:grad_sq", (0.52, 0.58, 0.63, 0.60))):
        for lr, acc in zip(grid, accs):
            record = run(arm, lr, 2.0 - acc)
            record["cell"]["schedule"], record["metrics"]["val_acc"] = "constant", acc
            constant.append(record)
    assert set(section.lr_curves(records + constant)) == {key, ("32-true", "facts-20", "qkv-r8", "constant")}
    row = next(line for line in section.lr_markdown(records + constant).splitlines() if "| constant |" in line)
    assert "| 1.500 / 1.480 (acc 0.500 / 0.520) |" in row
    # more seeds at an arm's worst LR: the worst is their mean ± std
    again = run("lora", 1e-4, 1.52, seed=1)
    again["cell"]["schedule"], again["metrics"]["val_acc"] = "constant", 0.48
    table = section.lr_markdown(records + constant + [again])
    row = next(line for line in table.splitlines() if "| constant |" in line)
    assert "| 1.510 ± 0.014 (2) / 1.480 (acc 0.490 ± 0.014 (2) / 0.520) |" in row

    # SMT's cells at k x each grid LR price lr_scale k: worst (accuracy) / best at 1 → 1.5 → 2 → 3, – where none ran
    def constant_smt(*points):
        for lr, acc in points:
            record = run("smt:grad_sq", lr, 2.0 - acc)
            record["cell"]["schedule"], record["metrics"]["val_acc"] = "constant", acc
            constant.append(record)
        return next(line for line in section.lr_markdown(records + constant).splitlines() if "| constant |" in line)

    row = constant_smt((9e-4, 0.62), (9e-3, 0.45))
    assert "| 1.480 (acc 0.520) / 1.370 → – → – → 1.550 (acc 0.450) / 1.380 |" in row
    row = constant_smt((2e-4, 0.55), (6e-4, 0.60), (2e-3, 0.64), (6e-3, 0.57))
    assert "| 1.480 (acc 0.520) / 1.370 → – → 1.450 (acc 0.550) / 1.360 → 1.550 (acc 0.450) / 1.380 |" in row
    # part of a multiple's grid ran: the worst of it bounds the whole grid's worst from below, no best is claimed
    row = constant_smt((4.5e-3, 0.51), (1.5e-4, 0.53))
    assert "| 1.480 (acc 0.520) / 1.370 → ≥ 1.490, acc ≤ 0.510 (2 of 4 LRs) → 1.450 (acc 0.550) / 1.360 →" in row


def test_a_constant_schedule_is_plain_adamw_and_cached_apart(tiny_run, quality):
    from smt.lightning.schedules import warmup_cosine

    shape = quality.SCHEDULES["constant"]
    multiplier = warmup_cosine(100, shape["lr_warmup_steps"], shape["min_lr_ratio"], shape["scheduler"])
    assert {multiplier(step) for step in range(100)} == {1.0}
    cell = quality.Cell("arc_easy", "smt:grad_sq", 1e-3, schedule="constant")
    assert cell.key().endswith("-constant.json") and cell.key() != replace(cell, schedule="cosine").key()
    out, results, markdown = tiny_run
    module, _ = quality.build_module(cell, quality.Harness.tiny(out))  # the cell's schedule reaches the module
    assert {k: module.hparams[k] for k in shape} == shape
    (record,) = [r for r in results if r["cell"].get("schedule") == "constant"]
    assert record["steps"] == 6 and "| smt:grad_sq constant-LR |" in markdown  # its own row, not the LR choice
    plan = quality.next_cells("user-lr", ["arc_easy"], "qkv", "r8", 1, None, quality.Harness(), schedule="constant")
    plan = list(plan)
    grid = [(arm, lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for arm in ("lora", "smt:grad_sq")]
    assert [(c.arm, c.lr) for c in plan] == grid
    assert {c.schedule for c in plan} == {"constant"}

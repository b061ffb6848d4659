"""The generated knowledge task: fixed facts, disjoint wordings, and records recall can score."""

from __future__ import annotations

import pytest

from smt.data.records import load_records
from smt.eval.knowledge import (
    ATTRIBUTES,
    TEST_WORDING,
    TRAIN_WORDINGS,
    VAL_WORDING,
    facts,
    knowledge_splits,
    write_facts,
)


def test_facts_are_fixed_distinct_and_cover_every_attribute():
    rows = facts(40)
    assert rows == facts(40) and len(rows) == 40
    assert len({(r["name"], r["attribute"]) for r in rows}) == 40
    assert {r["attribute"] for r in rows} == set(ATTRIBUTES)
    assert all(r["value"] in ATTRIBUTES[r["attribute"]]["values"] for r in rows)
    with pytest.raises(ValueError, match="multiple of 4"):
        facts(10)


def test_held_out_questions_are_never_trained_and_answers_match():
    splits = knowledge_splits(40, n_eval=12)
    trained_questions = {r["instruction"] for r in splits["train"]}
    assert len(splits["train"]) == 40 * len(TRAIN_WORDINGS)
    assert not trained_questions & {r["instruction"] for r in splits["val"] + splits["test"]}
    assert {r["instruction"] for r in splits["trained"]} <= trained_questions
    for split in ("trained", "val", "test"):
        assert len(splits[split]) == 12
        for r in splits[split]:
            assert r["output"].startswith(r["context"] + r["choices"][r["label"]])
            assert r["choices"][r["label"]].strip() == r["answer"]
    for spec in ATTRIBUTES.values():
        assert len(set(spec["questions"])) == 5 and {VAL_WORDING, TEST_WORDING}.isdisjoint(TRAIN_WORDINGS)


def test_written_files_load_as_records_with_held_out_wordings(tmp_path):
    written = write_facts(8, tmp_path / "facts")
    loaded = {split: load_records(path, tmp_path / "cache") for split, path in written.items()}
    assert [len(loaded[s]) for s in ("train", "val", "test")] == [8 * len(TRAIN_WORDINGS), 8, 8]
    trained = set(loaded["train"]["instruction"])
    assert not trained & set(loaded["val"]["instruction"]) and not trained & set(loaded["test"]["instruction"])
    assert set(loaded["test"]["response"]) == set(loaded["train"]["response"])  # same answers, new questions
    assert set(loaded["test"]["reference"]) == {r["value"] for r in facts(8)}

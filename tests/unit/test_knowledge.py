"""The generated knowledge task: fixed facts, disjoint wordings, and records recall can score."""

from __future__ import annotations

import pytest

from smt.eval.knowledge import ATTRIBUTES, TEST_WORDING, TRAIN_WORDINGS, VAL_WORDING, facts, knowledge_splits


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

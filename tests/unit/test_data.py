"""InstructionDataModule and its pieces on fixture files in the real LLM-Adapters / GSM8K schemas.

The tokenizer is a word-level one trained in-process on the fixture text, so every expected token list is
computed here from the same tokenizer, and exact label masks can be asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from smt.data.loss import IGNORE_INDEX
from smt.data.prompts import render_prompt
from smt.data.records import split_indices, take_limit
from smt.data.tokens import InstructionCollator, fit_to_length, pack_examples
from smt.lightning.datamodule import InstructionDataModule

BOOLQ_ROWS = [
    {
        "instruction": f"Please answer the following question with true or false, question: is fact {i} true?"
        "\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {'true' if i % 3 else 'false'}",
        "answer": "true" if i % 3 else "false",
    }
    for i in range(20)
]
WITH_INPUT_ROW = {
    "instruction": "Summarize the passage in one word.",
    "input": "The cat sat on the mat all day long.",
    "output": "cat",
    "answer": "",
}
GSM8K_ROWS = [
    {
        "question": "Janet has 16 eggs and eats 3. She sells the rest for $2 each. How much does she make?",
        "answer": "She has 16 - 3 = <<16-3=13>>13 eggs.\nShe makes 13 * 2 = $<<13*2=26>>26.\n#### 26",
    },
    {
        "question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
        "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber.\nSo 2+1=<<2+1=3>>3 bolts.\n#### 3",
    },
]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|> "


def _write_json(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tokenizer(with_pad: bool = False, with_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the fixture text, ids 0..3 = <pad> <unk> <s> </s>; BOS added when asked."""
    texts = [render_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in [*BOOLQ_ROWS, WITH_INPUT_ROW]]
    texts += [render_prompt("smt", "x") + render_prompt("gsm8k", r["question"]) + r["answer"] for r in GSM8K_ROWS]
    texts += [CHAT_TEMPLATE, "<|user|> <|assistant|>"]
    model = Tokenizer(models.WordLevel(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    if with_bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    pad = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **pad)


def _module(tmp_path: Path, tokenizer=None, **kwargs) -> InstructionDataModule:
    kwargs.setdefault("train_path", _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS))
    dm = InstructionDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.set_tokenizer(tokenizer or _tokenizer())
    return dm


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# ------------------------------------------------------------------------------------------------ masking
def test_labels_mask_the_prompt_and_keep_response_and_eos(tmp_path):
    tok = _tokenizer()
    dm = _module(tmp_path, tok, max_length=256)
    dm.setup("fit")
    row, item = BOOLQ_ROWS[0], dm.train_dataset[0]
    prompt = _ids(tok, render_prompt("alpaca", row["instruction"]), special=True)
    response = _ids(tok, row["output"]) + [tok.eos_token_id]
    assert prompt[0] == tok.bos_token_id
    assert item["input_ids"] == prompt + response
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_without_prompt_masking_labels_equal_inputs(tmp_path):
    dm = _module(tmp_path, mask_prompt=False)
    dm.setup("fit")
    item = dm.train_dataset[3]
    assert item["labels"] == item["input_ids"] and item["labels"][-1] == dm.tokenizer.eos_token_id


def test_alpaca_uses_the_input_variant_only_when_there_is_input():
    with_input = render_prompt("alpaca", WITH_INPUT_ROW["instruction"], WITH_INPUT_ROW["input"])
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize the passage in "
        "one word.\n\n### Input:\nThe cat sat on the mat all day long.\n\n### Response:\n"
    )
    assert "### Input" not in render_prompt("alpaca", "Say hi.", "  ")


def test_smt_template_is_the_single_section_form_with_input_appended():
    assert render_prompt("smt", "Add 2 and 3.", "Use digits.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. \n\n### Instruction:\nAdd 2 and 3.\n\nUse digits.\n\n### Response:\n"
    )


def test_gsm8k_jsonl_trains_on_the_solution_without_calculator_notes(tmp_path):
    tok = _tokenizer()
    path = _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    dm = _module(tmp_path, tok, train_path=path, template="gsm8k", max_length=256)
    dm.setup("fit")
    solution = "She has 16 - 3 = 13 eggs.\nShe makes 13 * 2 = $26.\n#### 26"
    response = _ids(tok, " " + solution) + [tok.eos_token_id]
    labels = dm.train_dataset[0]["labels"]
    assert labels[-len(response) :] == response and set(labels[: -len(response)]) == {IGNORE_INDEX}


def test_chat_template_renders_through_the_tokenizer_without_a_second_bos(tmp_path):
    tok = _tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    dm = _module(tmp_path, tok, template="chat", max_length=256)
    dm.setup("fit")
    prompt = _ids(tok, f"<|user|> {BOOLQ_ROWS[0]['instruction']} <|assistant|> ")
    item = dm.train_dataset[0]
    assert item["input_ids"][: len(prompt)] == prompt and tok.bos_token_id not in item["input_ids"]
    assert item["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


# --------------------------------------------------------------------------------------------- truncation
def test_fit_to_length_cuts_the_prompt_from_the_left_and_keeps_bos():
    prompt, response = [2, 10, 11, 12, 13, 14], [20, 21, 3]
    assert fit_to_length(prompt, response, 6, keep_first=True) == ([2, 13, 14], response)
    assert fit_to_length(prompt, response, 6) == ([12, 13, 14], response)
    assert fit_to_length(prompt, response, 20) == (prompt, response)
    assert fit_to_length(prompt, response, 3, keep_first=True) == ([14], [20, 21])  # only an over-long response is cut


def test_truncation_keeps_the_whole_response(tmp_path):
    tok = _tokenizer()
    dm = _module(tmp_path, tok, max_length=12)
    dm.setup("fit")
    response = _ids(tok, BOOLQ_ROWS[0]["output"]) + [tok.eos_token_id]
    item = dm.train_dataset[0]
    assert len(item["input_ids"]) == 12
    assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"][-len(response) :] == response
    assert item["labels"] == [IGNORE_INDEX] * (12 - len(response)) + response


# ------------------------------------------------------------------------------------------------ packing
def test_packing_concatenates_whole_examples_with_restarting_positions():
    examples = [
        {"input_ids": [2, 5, 6, 3], "labels": [-100, -100, 6, 3]},
        {"input_ids": [2, 7, 3], "labels": [2, 7, 3]},
    ]
    examples.append({"input_ids": [2, 8, 9, 3], "labels": [-100, 8, 9, 3]})
    blocks = pack_examples(examples, max_length=8)
    assert [b["input_ids"] for b in blocks] == [[2, 5, 6, 3, 2, 7, 3], [2, 8, 9, 3]]
    assert blocks[0]["labels"] == [-100, -100, 6, 3, -100, 7, 3]  # no label predicted across the boundary
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    batch = InstructionCollator(pad_id=0)(blocks)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2]  # padding is its own segment
    assert batch["labels"][1, 4:].tolist() == [IGNORE_INDEX] * 3


def test_packed_batch_gives_each_example_the_logits_it_has_alone():
    from helpers import tiny_llama

    model = tiny_llama(layers=2, hidden=32, vocab=32, attn="sdpa").eval()
    first, second = [2, 5, 6, 7, 3], [2, 9, 10, 3]
    blocks = pack_examples([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}], 16)
    batch = InstructionCollator(pad_id=0)(blocks)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(packed[len(first) : len(first) + len(second)], alone, atol=1e-5, rtol=1e-4)


def test_packing_in_the_data_module_keeps_every_token_once(tmp_path):
    dm = _module(tmp_path, max_length=128, packing=True)
    dm.setup("fit")
    plain = _module(tmp_path / "plain", max_length=128, train_path=dm.train_path)
    plain.setup("fit")
    assert all(len(block["input_ids"]) <= 128 for block in dm.train_dataset) and len(dm.train_dataset) <= 10
    assert sum(len(b["input_ids"]) for b in dm.train_dataset) == sum(len(r) for r in plain.train_dataset["input_ids"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}


# ------------------------------------------------------------------------------------ splits and shuffling
def test_val_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(20, 0.25, seed=1)
    assert len(val) == 5 and sorted(train + val) == list(range(20))
    assert split_indices(20, 0.25, seed=1) == (train, val)
    assert split_indices(20, 0.25, seed=2)[1] != val
    assert len(split_indices(20, 3, seed=1)[1]) == 3
    with pytest.raises(ValueError, match="leaves none"):
        split_indices(4, 4, seed=0)


def test_take_limit_is_a_seeded_subset():
    assert take_limit(range(10), None, 0) == list(range(10))
    subset = take_limit(range(100, 150), 5, seed=3)
    assert len(subset) == 5 and subset == take_limit(range(100, 150), 5, seed=3) and subset != list(range(100, 105))


def test_module_split_and_limits_are_reproducible(tmp_path):
    def build(folder: str, seed: int) -> InstructionDataModule:
        dm = _module(tmp_path / folder, val_split=0.2, limit_train=6, seed=seed, train_path=train_path)
        dm.setup("fit")
        return dm

    train_path = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS)
    first, again, other = build("a", 7), build("b", 7), build("c", 8)
    assert len(first.train_dataset) == 6 and len(first.val_dataset) == 4
    val_ids = [list(dm.val_dataset["input_ids"]) for dm in (first, again, other)]
    assert val_ids[0] == val_ids[1] != val_ids[2]
    assert not set(map(tuple, first.val_dataset["input_ids"])) & set(map(tuple, first.train_dataset["input_ids"]))
    order = [next(iter(dm.train_dataloader()))["input_ids"].tolist() for dm in (first, again)]
    assert order[0] == order[1]


def test_several_train_files_train_together_and_share_one_validation_split(tmp_path):
    boolq = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS)
    gsm8k = _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    alone = [_module(tmp_path / name, train_path=path) for name, path in (("a", boolq), ("b", gsm8k))]
    mixed = _module(tmp_path / "c", train_path=[boolq, gsm8k], val_split=0.25, seed=3)
    for dm in (*alone, mixed):
        dm.setup("fit")
    every = [tuple(ids) for dm in alone for ids in dm.train_dataset["input_ids"]]
    held_out, kept = (list(map(tuple, d["input_ids"])) for d in (mixed.val_dataset, mixed.train_dataset))
    assert sorted(held_out + kept) == sorted(every) and len(held_out) == 6  # ¼ of 22, every record once
    rows = [row for batch in mixed.train_dataloader() for row in batch["attention_mask"].sum(1).tolist()]
    assert len(rows) == len(kept) == 16  # one epoch: every kept record of both files once


def test_several_train_files_of_one_task_fall_back_on_validation_for_test(tmp_path):
    first = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS[:10])
    second = _write_json(tmp_path / "x" / "boolq" / "train.json", BOOLQ_ROWS[10:])
    dm = _module(tmp_path, train_path=[first, second], val_split=4)
    dm.setup("test")
    assert list(dm.test_dataset["task"]) == ["boolq"] * 4


def test_several_train_files_of_several_tasks_need_test_paths(tmp_path):
    boolq = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS)
    gsm8k = _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    message = _one_line_error("several tasks", lambda: _module(tmp_path, train_path=[boolq, gsm8k], val_split=4)
                              .setup("test"))  # fmt: skip
    assert "boolq, gsm8k" in message and "test_paths" in message


def test_a_missing_file_in_a_train_list_is_named_with_its_position(tmp_path):
    boolq = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS)
    missing = str(tmp_path / "nope.json")
    message = _one_line_error("does not exist", lambda: _module(tmp_path, train_path=[boolq, missing]).setup("fit"))
    assert "train_path[1]" in message and missing in message


def test_collated_batches_are_right_padded_with_eos_as_pad(tmp_path):
    dm = _module(tmp_path, _tokenizer(with_pad=False), batch_size=4, val_split=4, eval_batch_size=4)
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    for row, length in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == dm.tokenizer.eos_token_id).all()


# ------------------------------------------------------------------------------------------ test prompts
def test_test_loader_yields_left_padded_prompts_references_and_tasks(tmp_path):
    tok = _tokenizer()
    boolq = _write_json(tmp_path / "llm_adapters" / "boolq" / "test.json", BOOLQ_ROWS[:3])
    gsm8k = _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    dm = _module(tmp_path, tok, test_paths=[boolq, gsm8k], eval_batch_size=8)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["task"] == ["boolq"] * 3 + ["gsm8k"] * 2
    assert batch["reference"] == ["false", "true", "true", "26", "3"]
    assert batch["prompt"][0] == render_prompt("alpaca", BOOLQ_ROWS[0]["instruction"])
    for row, prompt in enumerate(batch["prompt"]):
        ids = _ids(tok, prompt, special=True)
        assert batch["input_ids"][row, -len(ids) :].tolist() == ids  # left padding: the prompt ends the row
        assert batch["attention_mask"][row].sum() == len(ids) and batch["attention_mask"][row, -1] == 1


def test_test_prompts_are_cut_from_the_left_keeping_bos(tmp_path):
    tok = _tokenizer()
    dm = _module(tmp_path, tok, val_split=2, max_length=8)
    dm.setup("test")
    for ids, prompt in zip(dm.test_dataset["input_ids"], dm.test_dataset["prompt"], strict=True):
        full = _ids(tok, prompt, special=True)
        assert len(ids) == 8 and ids == full[:1] + full[-7:] and ids[0] == tok.bos_token_id


def test_test_data_falls_back_on_the_validation_split_and_limits(tmp_path):
    dm = _module(tmp_path, val_split=5, limit_val=3)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["task"] == ["boolq"] * 3 and all(ref in ("true", "false") for ref in batch["reference"])


def test_without_a_tokenizer_setup_waits_for_set_tokenizer(tmp_path):
    # Lightning runs the datamodule's setup before the LightningModule's, which may hand its tokenizer over.
    train = _write_json(tmp_path / "boolq" / "train.json", BOOLQ_ROWS)
    dm = InstructionDataModule(train_path=train, val_split=4, cache_dir=str(tmp_path / "cache"), batch_size=2)
    dm.setup("fit")
    assert dm.train_dataset is None
    dm.set_tokenizer(_tokenizer())
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 2 and len(dm.val_dataset) == 4


# ------------------------------------------------------------------------------------ plain text (pretraining)
TEXT_ROWS = [{"text": " ".join(BOOLQ_ROWS[i]["output"] for i in range(n))} for n in (1, 7)]


def test_text_records_train_on_every_token_in_consecutive_windows(tmp_path):
    tok = _tokenizer()
    path = _write_jsonl(tmp_path / "code" / "train.jsonl", TEXT_ROWS)
    dm = _module(tmp_path, tok, train_path=path, template="text", max_length=9)
    dm.setup("fit")
    bos = tok.bos_token_id
    windows = []
    for row in TEXT_ROWS:
        text = _ids(tok, row["text"]) + [tok.eos_token_id]
        windows += [text[start : start + 8] for start in range(0, len(text), 8)]
    assert len(text) > 3 * 8  # the long record really is split, not truncated
    items = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    assert [item["input_ids"] for item in items] == [[bos] + w for w in windows if len(w) > 1]
    assert all(item["labels"] == [IGNORE_INDEX] + item["input_ids"][1:] for item in items)


def test_text_records_with_an_instruction_template_are_refused_in_one_line(tmp_path):
    path = _write_jsonl(tmp_path / "code" / "train.jsonl", TEXT_ROWS)
    message = _one_line_error("no instruction", lambda: _module(tmp_path, train_path=path).setup("fit"))
    assert "template='text'" in message


# ------------------------------------------------------------------------------------------------ errors
def _one_line_error(match: str, build) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        build()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.json")
    message = _one_line_error("does not exist", lambda: _module(tmp_path, train_path=missing).setup("fit"))
    assert missing in message and "train_path" in message


def test_broken_json_is_one_line_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "Say hi.", "output": "hi"},')
    _one_line_error("not a JSON array or JSONL", lambda: _module(tmp_path, train_path=str(path)).setup("fit"))


def test_missing_field_names_the_field_and_fix(tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "answer": "hi"}]
    path = _write_json(tmp_path / "bad.json", rows)
    message = _one_line_error("'output'", lambda: _module(tmp_path, train_path=path).setup("fit"))
    assert path in message and "question/answer" in message


def test_null_field_names_the_row(tmp_path):
    rows = [dict(BOOLQ_ROWS[0]), {**BOOLQ_ROWS[1], "output": None}]
    path = _write_json(tmp_path / "nulls.json", rows)
    _one_line_error(r"row 1 has no 'output'", lambda: _module(tmp_path, train_path=path).setup("fit"))


def test_test_file_without_answers_and_unknown_task(tmp_path):
    no_answer = [{k: v for k, v in row.items() if k != "answer"} for row in BOOLQ_ROWS[:2]]
    path = _write_json(tmp_path / "boolq" / "test.json", no_answer)
    _one_line_error("'answer'", lambda: _module(tmp_path, test_paths=[path]).setup("test"))
    unnamed = _write_json(tmp_path / "mystery" / "test.json", BOOLQ_ROWS[:2])
    _one_line_error("test_tasks", lambda: _module(tmp_path, test_paths=[unnamed]).setup("test"))
    dm = _module(tmp_path, test_paths=[unnamed], test_tasks=["BoolQ"])
    dm.setup("test")
    assert list(dm.test_dataset["task"]) == ["boolq", "boolq"]


def test_bad_arguments_fail_at_construction(tmp_path):
    _one_line_error("template='plain'", lambda: InstructionDataModule(template="plain"))
    _one_line_error("use one of them", lambda: InstructionDataModule(val_path="v.json", val_split=0.1))
    _one_line_error("max_length", lambda: InstructionDataModule(max_length=1))
    _one_line_error("empty list", lambda: InstructionDataModule(train_path=[]))


def test_tokenizer_is_loaded_locally_or_explained(tmp_path):
    _one_line_error("no tokenizer", lambda: InstructionDataModule(train_path="x.json").tokenizer)
    missing = str(tmp_path / "no-such-model")
    _one_line_error("neither a folder nor a hub id", lambda: InstructionDataModule(tokenizer=missing).tokenizer)
    _tokenizer(with_pad=False).save_pretrained(tmp_path / "tok")
    loaded = InstructionDataModule(tokenizer=str(tmp_path / "tok")).tokenizer
    assert loaded.pad_token_id == loaded.eos_token_id == 3


# ------------------------------------------------------------------------------------ real rows (optional)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_llm_adapters_and_gsm8k_files_load(tmp_path):
    adapters = SHARED_DATA / "llm_adapters"
    tests = [adapters / "ARC-Easy" / "test.json", adapters / "AQuA" / "test.json", SHARED_DATA / "gsm8k" / "test.jsonl"]
    train = str(adapters / "boolq" / "train.json")
    dm = _module(
        tmp_path, train_path=train, test_paths=[str(p) for p in tests], limit_train=8, val_split=4, limit_test=3
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 4
    assert all(labels[-1] == dm.tokenizer.eos_token_id for labels in dm.train_dataset["labels"])
    references = dict(zip(dm.test_dataset["task"], dm.test_dataset["reference"], strict=True))
    assert set(references) == {"ARC-Easy", "AQuA", "gsm8k"}
    assert references["ARC-Easy"].startswith("answer") and references["AQuA"] in "ABCDE"
    assert float(references["gsm8k"]) == int(references["gsm8k"])

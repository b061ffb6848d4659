"""Models, tokenizers and data sets by hub id, offline.

The tests write a tiny model, a tokenizer and a data set into temporary caches laid out as huggingface_hub and
datasets lay out real downloads, point the libraries at them and load everything by id with HF_HUB_OFFLINE=1
(``tests/conftest.py`` sets it for every test: no test touches the network).
"""

import datasets
import huggingface_hub.constants
import pytest
import torch
from helpers import tiny_llama, write_hub_dataset, write_hub_snapshot
from transformers import ByT5Tokenizer

from smt.data.hub import HubDataset, parse_hub_dataset
from smt.data.records import load_records
from smt.lightning.datamodule import InstructionDataModule
from smt.lightning.module import SMTLanguageModel, load_causal_lm

MODEL_ID = "smt-test/tiny-llama"
ROWS = [
    {"instruction": f"Is {i} even?", "input": "", "output": "yes" if i % 2 else "no", "answer": ""} for i in range(6)
]
TEST_ROWS = [{**row, "answer": row["output"]} for row in ROWS[:2]]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and datasets cache that the libraries use instead of ~/.cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.fixture
def cached_model(hub_cache):
    """A tiny Llama with a byte-level tokenizer, in the hub cache as ``smt-test/tiny-llama``."""
    model = tiny_llama(vocab=384)
    folder = hub_cache / "download"
    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    write_hub_snapshot(hub_cache / "hub", MODEL_ID, folder)
    return model


def test_a_model_and_its_tokenizer_load_by_hub_id_offline(cached_model):
    module = SMTLanguageModel(model=MODEL_ID)
    loaded = module.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in cached_model.state_dict().items())
    assert module.tokenizer("hi")["input_ids"][:2] == [107, 108]  # bytes + 3
    assert load_causal_lm(MODEL_ID, None, "float32", "eager", local_files_only=True).config.vocab_size == 384


def test_an_id_neither_cached_nor_reachable_gets_one_line(hub_cache, monkeypatch):
    with pytest.raises(ValueError) as offline:
        SMTLanguageModel(model="smt-test/not-downloaded")
    message = str(offline.value)
    assert "\n" not in message and "model.model='smt-test/not-downloaded'" in message and "HF_HUB_OFFLINE=1" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, but told not to download
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache .* local_files_only=True forbids"):
        load_causal_lm("smt-test/not-downloaded", None, "float32", "eager", local_files_only=True)
    with pytest.raises(ValueError, match=r"is neither a folder nor a hub id"):
        load_causal_lm(str(hub_cache / "no" / "folder"), None, "float32", "eager")


def test_hub_dataset_names_parse_and_never_look_like_files():
    assert parse_hub_dataset("data/train.json", "train", "train_path") is None
    assert parse_hub_dataset("./hub:odd.json", "train", "train_path") is None
    assert parse_hub_dataset("hub:openai/gsm8k:main@test", "train", "f") == HubDataset("openai/gsm8k", "main", "test")
    assert parse_hub_dataset("hub:owner/name", "validation", "f") == HubDataset("owner/name", None, "validation")
    assert parse_hub_dataset("hub:owner/name@train[:100]", "test", "f").split == "train[:100]"
    with pytest.raises(ValueError, match=r"^f='hub:a/b/c' is not hub:owner/name\[:config\]\[@split\]"):
        parse_hub_dataset("hub:a/b/c", "train", "f")


def test_train_and_test_data_load_by_hub_id_offline(hub_cache):
    write_hub_dataset(hub_cache / "datasets", "smt-test/boolq", {"train": ROWS, "test": TEST_ROWS})
    dm = InstructionDataModule(
        train_path="hub:smt-test/boolq", test_paths=["hub:smt-test/boolq"], val_split=2, batch_size=2
    )
    dm.set_tokenizer(ByT5Tokenizer())
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2  # split "train" by default
    assert list(dm.test_dataset["task"]) == ["boolq", "boolq"] and list(dm.test_dataset["reference"]) == ["no", "yes"]
    sliced = load_records("hub:smt-test/boolq:default@train[:3]", None)
    assert list(sliced["response"]) == ["no", "yes", "no"]


def test_hub_data_that_does_not_load_is_one_line(hub_cache):
    write_hub_dataset(hub_cache / "datasets", "smt-test/boolq", {"train": ROWS})
    with pytest.raises(ValueError) as missing:
        load_records("hub:smt-test/elsewhere", None, "train_path")
    assert "\n" not in str(missing.value) and "smt-test/elsewhere is not in the datasets cache" in str(missing.value)
    assert "HF_HUB_OFFLINE=1" in str(missing.value)
    with pytest.raises(ValueError, match=r"^val_path='hub:smt-test/boolq@validation' does not load \(Unknown"):
        load_records("hub:smt-test/boolq", None, "val_path", default_split="validation")


def test_an_unreachable_hub_is_one_line_that_names_the_offline_switch(monkeypatch):
    from smt.data.hub import from_pretrained

    def unreachable(name, **kwargs):  # what transformers raises online without a network, after its retries
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError) as error:
        from_pretrained(unreachable, "meta-llama/Meta-Llama-3-8B", "model.model")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.model='meta-llama/Meta-Llama-3-8B' is not a folder")
    assert "couldn't connect" in message and "HF_HUB_OFFLINE=1" in message

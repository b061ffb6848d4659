"""Shared test setup: offline hub, fixed seeds for every test, the gpu marker, tests/ on the import path."""

import os
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton runs on CPU only in its interpreter, chosen before any kernel is defined; on a GPU machine the
# real compiler must be used, or the GPU tests would silently test the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network: models, tokenizers and data sets named by hub id come from caches the tests
# write (huggingface_hub and datasets read these before any test imports them; subprocesses inherit them).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

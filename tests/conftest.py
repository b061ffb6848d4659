"""Shared test setup: offline hub, fixed seeds for every test, the gpu marker, tests/ on the import path, a clean
checkout.

A session that leaves a new untracked or ignored path in the checkout fails (tool caches aside): every test
writes under ``tmp_path`` (``configs/debug*.yaml`` write ``runs/…`` relative to the working directory).
"""

import os
import subprocess
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
REPO = Path(__file__).resolve().parents[1]
TOOL_CACHES = {".venv", ".pytest_cache", ".hypothesis", "__pycache__", ".ruff_cache"}
UNTRACKED_BEFORE = pytest.StashKey[set | None]()


def pytest_configure(config):
    """``SMT_TEST_CPU=avx2``: bitsandbytes behaves as on a CPU without AVX512-BF16 (no 4-bit repacking).

    With ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (read by torch at start) the suite then runs the
    kernels an AVX2-only machine runs: ``make test-avx2``.
    """
    if os.environ.get("SMT_TEST_CPU") == "avx2":
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


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


def untracked_paths() -> set[str] | None:
    """Untracked and ignored paths of the checkout as git lists them (folders collapsed), tool caches left out.

    None outside a git checkout (an unpacked sdist): then nothing is checked.
    """
    try:
        listing = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "-z"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    paths = {entry[3:] for entry in listing.split("\0") if entry[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in TOOL_CACHES or part.endswith(".egg-info") for part in Path(p).parts)}


def pytest_sessionstart(session):
    session.config.stash[UNTRACKED_BEFORE] = untracked_paths()


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config.stash.get(UNTRACKED_BEFORE, None), untracked_paths()
    if before is None or after is None or not (new := sorted(after - before)):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", f"tests left {new} in the checkout {REPO}; write them under tmp_path", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

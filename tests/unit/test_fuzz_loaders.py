"""Fuzzing every loader of a file a user may be sent: the only failure allowed is a one-line ``ValueError``.

Each loader gets a valid file mutated by hypothesis (truncated, bit-flipped, bytes overwritten, metadata
replaced by wrong-typed JSON, safetensors headers claiming huge tensors) and must either load it or refuse
it cleanly: no other exception, no multi-line message, no allocation beyond the file's size. Example counts
are bounded so the suite stays fast; raise ``FUZZ_EXAMPLES`` locally for a longer hunt.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smt.adapters.delta import read_delta
from smt.core.io import atomic_save_safetensors
from smt.core.selection import Selection
from smt.kernels.blocks import BlockGrid
from smt.lightning.checkpoint_io import read_checkpoint

FUZZ_EXAMPLES = int(os.environ.get("SMT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
GRIDS = {"layers.0.q": BlockGrid(8, 8, 4, 4), "layers.0.v": BlockGrid(8, 6, 4, 4)}


def valid_selection_bytes(folder: Path) -> bytes:
    blocks = {"layers.0.q": torch.tensor([[0, 1], [1, 0]]), "layers.0.v": torch.tensor([[1, 1]])}
    scores = {name: torch.rand(grid.shape) for name, grid in GRIDS.items()}
    selection = Selection(blocks, dict(GRIDS), "grad_sq", {"num_blocks": 3}, 2, "tiny", scores)
    return selection.save(folder / "selection.safetensors").read_bytes()


def valid_delta_bytes(folder: Path) -> bytes:
    tensors = {
        "layers.0.q.smt_index": torch.tensor([[0, 1], [1, 0]], dtype=torch.int32),
        "layers.0.q.smt_delta": torch.randn(2, 4, 4).to(torch.bfloat16),
        "layers.0.v.smt_index": torch.tensor([[1, 1]], dtype=torch.int32),
        "layers.0.v.smt_delta": torch.randn(1, 4, 4).to(torch.bfloat16),
    }
    metadata = {
        "format": "smt.delta",
        "format_version": "1",
        "grids": json.dumps({n: [g.out_features, g.in_features, g.block_rows, g.block_cols] for n, g in GRIDS.items()}),
        "base_model_id": "tiny",
        "dtype": "bfloat16",
        "provenance": json.dumps({"criterion": "grad_sq", "budget": {"num_blocks": 3}, "warmup_steps": 2}),
    }
    return atomic_save_safetensors(tensors, folder / "delta.safetensors", metadata).read_bytes()


def valid_checkpoint_bytes(folder: Path) -> bytes:
    checkpoint = {
        "state_dict": {"model.w": torch.randn(6, 6), "model.smt_bank.map": torch.zeros(3, 3, dtype=torch.long)},
        "global_step": 4,
        "hyper_parameters": {"lr": 0.01, "model": None},
        "callbacks": {"SparseMatrixTuning": {"phase": "tuning", "steps_scored": 3}},
    }
    torch.save(checkpoint, folder / "valid.ckpt")
    return (folder / "valid.ckpt").read_bytes()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("originals")
    return {
        "selection": valid_selection_bytes(folder),
        "delta": valid_delta_bytes(folder),
        "checkpoint": valid_checkpoint_bytes(folder),
    }


LOADERS = {"selection": Selection.load, "delta": read_delta, "checkpoint": read_checkpoint}


def reset_peak_rss() -> int:
    """Reset this process's peak resident set (VmHWM) to the current one and return it, in KiB.

    ``ru_maxrss`` is a lifetime peak: after one large earlier test it would hide any allocation below it.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_rss() -> int:
    return _status_kib("VmHWM")


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def load_or_refuse(kind: str, path: Path) -> str:
    """``ok`` or ``refused``; any exception other than a one-line ValueError fails the test."""
    try:
        LOADERS[kind](path)
    except ValueError as err:
        assert "\n" not in str(err), f"multi-line error: {err}"
        assert str(path) in str(err) or path.name in str(err), f"error does not name the file: {err}"
        return "refused"
    return "ok"


@st.composite
def mutations(draw, size: int):
    """A list of (kind, position, value) edits of a file of ``size`` bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "flip_many"]))
    position = draw(st.integers(0, size - 1))
    if kind == "truncate":
        return kind, position, b""
    if kind == "flip":
        return kind, position, bytes([1 << draw(st.integers(0, 7))])
    if kind == "overwrite":
        return kind, position, draw(st.binary(min_size=1, max_size=16))
    return kind, position, draw(st.binary(min_size=2, max_size=8))


def mutate(data: bytes, mutation) -> bytes:
    kind, position, value = mutation
    if kind == "truncate":
        return data[:position]
    out = bytearray(data)
    if kind == "flip":
        out[position] ^= value[0]
    elif kind == "overwrite":
        out[position : position + len(value)] = value
    else:  # flip_many: xor bytes spread over the file
        for i, mask in enumerate(value):
            out[(position + i * 977) % len(out)] ^= mask or 1
    return bytes(out)


@pytest.mark.parametrize("kind", LOADERS)
@FUZZ
@given(data=st.data())
def test_damaged_files_are_loaded_or_refused_with_one_line(kind, originals, tmp_path_factory, data):
    original = originals[kind]
    mutation = data.draw(mutations(len(original)))
    path = tmp_path_factory.mktemp("fuzz") / f"file.{'ckpt' if kind == 'checkpoint' else 'safetensors'}"
    damaged = mutate(original, mutation)
    path.write_bytes(damaged)
    if load_or_refuse(kind, path) == "ok" and kind == "checkpoint":  # a flip in padding or an unused field is fine
        loaded, expected = read_checkpoint(path), torch.load(io.BytesIO(original), weights_only=True)
        assert loaded["state_dict"].keys() == expected["state_dict"].keys()  # ... but never a changed weight (CRC-32)
        assert all(torch.equal(loaded["state_dict"][k], v) for k, v in expected["state_dict"].items())
        assert {k: v for k, v in loaded.items() if k != "state_dict"} == {
            k: v for k, v in expected.items() if k != "state_dict"
        }


def rewrite_header(data: bytes, edit) -> bytes:
    """Apply ``edit`` to a safetensors file's JSON header (the tensor bytes stay)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header = edit(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("kind", ["selection", "delta"])
@FUZZ
@given(field=st.sampled_from(["grids", "provenance", "budget", "warmup_steps", "format_version", "criterion"]),
       value=JSON_VALUES)  # fmt: skip
def test_wrong_typed_metadata_is_refused_with_one_line(kind, originals, tmp_path_factory, field, value):
    def edit(header):
        header["__metadata__"][field] = json.dumps(value)
        return header

    path = tmp_path_factory.mktemp("meta") / "file.safetensors"
    path.write_bytes(rewrite_header(originals[kind], edit))
    result = load_or_refuse(kind, path)
    needed = field == "grids" or (field == "provenance" and kind == "delta")  # (a selection has no provenance)
    if needed and not isinstance(value, dict):
        assert result == "refused"  # the file cannot be interpreted without it: never loaded as "ok"


@pytest.mark.parametrize("kind", ["selection", "delta"])
@FUZZ
@given(
    dims=st.lists(st.integers(0, 2**40), min_size=0, max_size=4),
    dtype=st.sampled_from(["F32", "BF16", "F16", "I32", "I64", "U8", "BOOL", "F64", "F8_E4M3", "XX"]),
    which=st.integers(0, 3),
)
def test_huge_or_wrong_tensor_headers_never_allocate(kind, originals, tmp_path_factory, dims, dtype, which):
    def edit(header):
        name = sorted(k for k in header if k != "__metadata__")[which % (len(header) - 1)]
        header[name]["shape"], header[name]["dtype"] = dims, dtype
        return header

    path = tmp_path_factory.mktemp("huge") / "file.safetensors"
    path.write_bytes(rewrite_header(originals[kind], edit))
    before = reset_peak_rss()
    load_or_refuse(kind, path)
    assert peak_rss() - before < 200_000  # KiB: nothing near 2^40 elements


def test_a_header_claiming_a_2_to_the_40_element_tensor_is_refused(originals, tmp_path):
    def edit(header):
        header["layers.0.q.smt_delta"]["shape"] = [2**20, 2**10, 2**10]
        return header

    path = tmp_path / "huge.safetensors"
    path.write_bytes(rewrite_header(originals["delta"], edit))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_delta(path)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        read_checkpoint(path)
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_a_legacy_or_compressed_checkpoint_is_refused_before_torch_parses_it(originals, tmp_path):
    import zipfile

    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_checkpoint(legacy)
    compressed = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(tmp_path / "valid.zip", "w") as out:
        out.writestr("x", b"")
    (tmp_path / "valid.ckpt").write_bytes(originals["checkpoint"])
    with zipfile.ZipFile(tmp_path / "valid.ckpt") as source, zipfile.ZipFile(compressed, "w") as out:
        for record in source.infolist():
            out.writestr(record.filename, source.read(record), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="compressed or oversized"):
        read_checkpoint(compressed)


@FUZZ
@given(text=st.text(max_size=200), position=st.integers(0, 400))
def test_damaged_yaml_configs_are_refused_without_running_code(tmp_path_factory, text, position):
    from jsonargparse import ArgumentParser

    from smt.lightning.callback import SparseMatrixTuning

    source = Path(__file__).parents[2] / "configs" / "debug.yaml"
    yaml = source.read_text()
    damaged = yaml[:position] + text + yaml[position:]
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(damaged)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(SparseMatrixTuning, "smt")
    parser.add_argument("--seed_everything", default=None)
    for group in ("trainer", "model", "data"):
        parser.add_argument(f"--{group}", type=dict, default={})
    try:
        parser.parse_args(["--config", str(path)])
    except Exception as err:  # jsonargparse's ArgumentError or a ValueError from SMTConfig
        assert type(err).__name__ in ("ArgumentError", "ValueError", "NSKeyError"), repr(err)


def test_yaml_tags_that_would_run_code_are_not_executed(tmp_path):
    from jsonargparse import ArgumentParser

    path = tmp_path / "hostile.yaml"
    path.write_text(f"value: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--value", default=None)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        parser.parse_args(["--config", str(path)])
    assert not (tmp_path / "pwned").exists()


@FUZZ
@given(text=st.text(max_size=300))
def test_damaged_data_files_are_refused_with_one_line(tmp_path_factory, text):
    from smt.data.records import load_records

    folder = tmp_path_factory.mktemp("data")
    path = folder / "train.json"
    records = [{"instruction": "What is 1 plus 2?", "input": "", "output": "3", "answer": "3"}] * 3
    valid = json.dumps(records)
    path.write_text(valid[: len(valid) // 2] + text)
    try:
        load_records(path, folder / "cache")
    except ValueError as err:
        assert "\n" not in str(err)

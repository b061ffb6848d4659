"""``scripts/gpu_check.py --dry-run``: the GPU check's code paths on CPU, so the script cannot rot before a GPU comes.

The dry run runs in one subprocess where the packages the GPU image lacks cannot be imported (``bitsandbytes``,
``datasets``, ``jsonargparse``): a ``sitecustomize`` on ``PYTHONPATH`` puts ``None`` in their ``sys.modules`` slots
before anything else runs, in that process and in the ``pytest tests/gpu`` it starts, so they look uninstalled
(``importlib.util.find_spec`` answers None, as transformers and peft ask) and any import of them fails. The
numbers of a dry run mean nothing; these tests check the tables' shape, that every number is finite, and the
bookkeeping (phases, targets, budgets, failures) on hand-made inputs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import import_script

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_IMAGE = ("bitsandbytes", "datasets", "jsonargparse")
ARMS = ["full", "lora", "smt torch 16²", "smt triton 16²", "smt triton 8²"]


@pytest.fixture(scope="module")
def gpu_check():
    return import_script("gpu_check")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run without the packages the GPU image lacks: ``(exit code, output, results.json, summary.md, out)``."""
    root = tmp_path_factory.mktemp("gpu_check")
    blocker = root / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT_ON_GPU_IMAGE!r}:\n    sys.modules[name] = None\n"
    )
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    print(f"dry run: {time.perf_counter() - started:.0f} s")
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return done.returncode, done.stdout + done.stderr, results, summary, out


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_dry_run_finishes_every_phase_without_the_missing_packages(dry_run):
    code, output, results, _, out = dry_run
    assert code == 0, output[-3000:]
    statuses = {p["phase"]: p["status"] for p in results["phases"]}
    assert statuses == {"pytest": "ok", "kernels": "ok", "train": "ok", "multi_gpu": "skipped", "quantized": "skipped"}
    notes = {p["phase"]: p["note"] for p in results["phases"]}
    assert notes["multi_gpu"] == "needs ≥ 2 GPUs; this machine has 0"
    assert notes["quantized"].startswith("bitsandbytes does not import") and "\n" not in notes["quantized"]
    assert results["mode"] == "dry-run" and "--dry-run" in results["command"]
    assert set(results["versions"]) >= {"torch", "triton", "transformers", "lightning", "peft", "bitsandbytes"}
    assert sorted(p.name for p in out.iterdir()) == ["pytest_gpu.log", "results.json", "summary.md"]


def test_gpu_tests_are_collected_and_skipped_without_cuda(dry_run):
    tables = dry_run[2]["tables"]
    by_test = {row["test"]: row for row in tables["pytest"]}
    for test in ("test_block_weight_grad_matches_reference", "test_block_scores_match_reference",
                 "test_delta_matmuls_match_reference", "test_layer_backward_matches_the_torch_kernels"):  # fmt: skip
        assert by_test[test]["skipped"] > 0 and by_test[test]["passed"] == by_test[test]["failed"] == 0, test


def test_kernel_tables_have_a_checked_finite_row_per_case(dry_run, gpu_check):
    tables, sizes = dry_run[2]["tables"], gpu_check.KernelSizes.dry_run()
    cases = len(sizes.weights) * len(sizes.blocks)
    assert len(tables["block_dw"]) == cases * len(sizes.densities)
    assert len(tables["block_scores"]) == cases
    assert len(tables["delta_matmul"]) == cases * len(sizes.delta_densities)
    for row in tables["block_dw"]:
        assert _finite(row["block_ms"], row["tiles_bmm_ms"], row["dense_full_ms"], row["of_tiles_bmm"], row["k"])
        assert row["matches_reference"] and row["rel_error"] < 1e-3
    for row in tables["block_scores"]:
        assert _finite(row["scores_ms"], row["dense_dw_ms"], row["reference_ms"]) and row["matches_reference"]
        assert row["extra_mib"] is None  # no memory figure off GPU
    for row in tables["delta_matmul"]:
        assert _finite(row["materialize_fwd_ms"], row["additive_fwd_ms"], row["delta_matmul_t_ms"])
        assert row["matches_reference"]


def test_training_table_has_every_arm_at_both_shapes_with_matched_budgets(dry_run, gpu_check):
    rows, sizes = dry_run[2]["tables"]["train"], gpu_check.TrainSizes.dry_run()
    assert [(r["seq"], r["batch"], r["arm"]) for r in rows] == [(*shape, arm) for shape in sizes.shapes for arm in ARMS]
    for row in rows:
        assert row["status"] == "ok" and _finite(row["step_ms"], row["trainable"]), row
        assert row["peak_gib"] is None  # no memory figure off GPU
        if row["method"] == "smt":
            assert _finite(row["warmup_step_ms"], row["step_of_lora"], row["step_of_full"])
    lora = {r["seq"]: r["trainable"] for r in rows if r["method"] == "lora"}
    assert all(r["trainable"] == lora[r["seq"]] for r in rows if r["method"] == "smt")


def test_summary_holds_every_table_and_every_target(dry_run):
    _, output, results, summary, _ = dry_run
    assert "Dry run on CPU" in summary and "mean nothing" in summary
    for heading in ("## Targets", "## Phases", "## pytest", "## block_dw", "## block_scores", "## delta_matmul",
                    "## train"):  # fmt: skip
        assert heading in summary
    targets = results["targets"]
    assert sum(t["target"].startswith("block dW") for t in targets) == 2  # one per block size
    assert sum(t["target"] == "SMT step time ÷ LoRA's" for t in targets) == 6  # 3 SMT arms × 2 shapes
    assert {t["status"] for t in targets} <= {"pass (dry run)", "miss (dry run)", "not measured"}
    assert "| target | where | value | threshold | margin | status |" in output  # printed last, for the device reply


def test_targets_carry_signed_margins(gpu_check):
    report = sys.modules["gpu_check_report"]
    tables = {
        "block_dw": [{"block": 64, "weight": "w", "density": 0.01, "k": 1, "of_tiles_bmm": 0.95},
                     {"block": 64, "weight": "w", "density": 0.05, "k": 5, "of_tiles_bmm": 0.80}],
        "train": [{"method": "smt", "status": "ok", "arm": "smt triton 256²", "seq": 512, "batch": 8,
                   "step_of_lora": 0.80, "step_of_full": 0.50, "peak_of_lora": None}],
    }  # fmt: skip
    found = {t["target"]: t for t in report.judge(tables, dry_run=False)}
    dw = found["block dW TFLOP/s ÷ dense GEMM's on the same tiles"]
    assert dw["value"] == 0.80 and dw["margin"] == pytest.approx(-0.10) and dw["status"] == "miss"
    assert "1/2 rows meet it" in dw["where"]
    assert found["SMT step time ÷ LoRA's"]["status"] == "pass"
    assert found["SMT step time ÷ LoRA's"]["margin"] == pytest.approx(0.05)
    assert found["SMT step time ÷ full FT's"]["margin"] == pytest.approx(-0.10)
    assert found["SMT peak memory ÷ LoRA's"]["status"] == "not measured"


def test_a_failing_or_overrunning_phase_is_recorded_and_the_next_one_runs(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 0)
    report = gpu_check.Report(tmp_path, {"mode": "gpu", "command": "x", "cwd": ".", "machine": {}, "versions": {}})

    def broken(deadline):
        raise RuntimeError("kernel exploded\nsecond line")

    def endless(deadline):
        try:
            time.sleep(30)
        except Exception:  # a phase's own error handling (one arm failing) must not swallow the timeout
            return "ok", "swallowed"

    def fine(deadline):
        return "ok", f"{deadline():.0f} s left"

    statuses = [gpu_check.run_phase("kernels", broken, 5, report), gpu_check.run_phase("train", endless, 0.3, report),
                gpu_check.run_phase("quantized", fine, 5, report)]  # fmt: skip
    assert statuses == ["failed", "timeout", "ok"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert [p["note"] for p in written["phases"]][0] == "RuntimeError: kernel exploded"
    assert "Traceback" in written["phases"][0]["traceback"] and written["phases"][2]["note"] == "5 s left"
    assert "| kernels | failed |" in (tmp_path / "summary.md").read_text()


def test_pytest_log_is_counted_per_test_function(gpu_check):
    log = """tests/gpu/test_a.py::test_x[bf16-ragged] PASSED [ 10%]
tests/gpu/test_a.py::test_x[fp16-ragged] FAILED [ 20%]
tests/gpu/test_a.py::test_y SKIPPED (needs a CUDA device) [ 30%]
tests/gpu/test_b.py::test_z ERROR [ 40%]
=========== 1 failed, 1 passed, 1 skipped, 1 error in 3.21s ===========
"""
    rows, failures, summary = gpu_check.parse_pytest_log(log)
    assert rows == [
        {"file": "tests/gpu/test_a.py", "test": "test_x", "passed": 1, "failed": 1, "skipped": 0, "error": 0},
        {"file": "tests/gpu/test_a.py", "test": "test_y", "passed": 0, "failed": 0, "skipped": 1, "error": 0},
        {"file": "tests/gpu/test_b.py", "test": "test_z", "passed": 0, "failed": 0, "skipped": 0, "error": 1},
    ]
    assert failures == ["test_x[fp16-ragged] FAILED", "test_z ERROR"]
    assert summary == "1 failed, 1 passed, 1 skipped, 1 error in 3.21s"

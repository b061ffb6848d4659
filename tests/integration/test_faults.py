"""Faults during ``smt fit`` lose nothing: kills, SIGTERM, damaged checkpoints, a full disk.

One uninterrupted reference run, and chains of real ``smt fit`` processes on ``configs/debug.yaml`` (8 steps,
warm-up 3, regrowth every 2 tuning steps, a checkpoint every step: all mid-epoch), each process struck at a
chosen point and the next resumed with ``--ckpt_path last``. The CI chain:

1. SIGKILL after step 2 (inside the warm-up)                     → resumes from step 1
2. SIGKILL halfway through writing step 4's checkpoint, the first
   after the selection                                           → resumes from step 3 (selected, nothing tuned)
3. SIGTERM during step 6 (pre-emption)                           → saves last.ckpt at step 6, exits 143
4. resumed in-process                                            → step 8

In-process, a SIGTERM during the validation after step 4 saves last.ckpt at step 4 (exit 143) and resumes to the
same end.
The slow chain strikes five times (also after step 4, and inside the regrowth event of step 5). The full warm-up
chain (``smt.warmup_updates=full``: every weight trains in steps 1–3) strikes inside the warm-up (after step 2),
halfway through writing the selection step's checkpoint (step 3: resumes from step 2, one dense step left) and after
it (step 5: resumes from step 4, where the dense weights must be frozen again and their optimizer state freed). Each
chain's final weights, selection and delta equal its reference's bit for bit.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG_CONFIG, REPO
from safetensors.torch import load_file

from smt.lightning.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from smt.lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CHECKPOINT_EVERY_STEP = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.filename={step}",
]
REGROWTH = ["--smt.regrowth.every=2", "--smt.regrowth.accumulate=1", "--smt.regrowth.rate=0.5"]
CI_CHAIN = [(2, "batch_end", 1), (4, "checkpoint_write", 3), (6, "sigterm", 6)]
FULL_WARMUP = ["--smt.warmup_updates=full", "--smt.warmup_lr=0.003", "--model.slim_checkpoints=false"]
FULL_WARMUP_CHAIN = [(2, "batch_end", 1), (3, "checkpoint_write", 2), (5, "batch_end", 4)]
SLOW_CHAIN = [(2, "batch_end", 1), (4, "batch_end", 3), (5, "regrowth", 4), (6, "checkpoint_write", 5),
              (7, "sigterm", 7)]  # fmt: skip


def fit_args(train_file: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), *CHECKPOINT_EVERY_STEP,
            *REGROWTH, *extra]  # fmt: skip


def smt_fit_process(folder: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "integration"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "smt", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def strike(step: int, point: str) -> list[str]:
    return ["--trainer.callbacks+=fault_points.KillAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.point={point}"]  # fmt: skip


def checkpoints(folder: Path) -> Path:
    return folder / "runs" / "debug" / "checkpoints"


def uninterrupted_run(folder: Path, train_file: Path, *extra: str) -> Path:
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(fit_args(train_file, *extra)) == 0
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_file):
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), train_file)


def run_chain(folder: Path, train_file: Path, strikes, extra: tuple[str, ...] = ()) -> SimpleNamespace:
    """The struck runs one after another in ``folder``, then an in-process resume to the end."""
    records = []
    for number, (step, point, _) in enumerate(strikes):
        resume = ["--ckpt_path=last"] if number else []
        result = smt_fit_process(folder, fit_args(train_file, *extra, *resume, *strike(step, point)))
        half_written = [p.read_bytes() for p in checkpoints(folder).glob(".*.tmp")]
        last_step = read_checkpoint(checkpoints(folder) / "last.ckpt")["global_step"]
        records.append(SimpleNamespace(point=point, result=result, last_step=last_step, half_written=half_written))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        final_code = main(fit_args(train_file, *extra, "--ckpt_path=last"))
    return SimpleNamespace(folder=folder, records=records, final_code=final_code)


@pytest.fixture(scope="module")
def ci_chain(tmp_path_factory, train_file):
    return run_chain(tmp_path_factory.mktemp("ci_chain"), train_file, CI_CHAIN)


def check_strikes(chain, strikes, tmp_path) -> None:
    for record, (step, point, resumable_step) in zip(chain.records, strikes, strict=True):
        stderr = record.result.stderr
        if point == "sigterm":
            assert record.result.returncode == 143, stderr[-2000:]
            stops = [line for line in stderr.splitlines() if line.startswith("smt: stopped")]
            assert stops == [f"smt: stopped by SIGTERM at step {step}; resume with --ckpt_path {stops[0].split()[-1]}"]
        else:
            assert record.result.returncode == -9, (point, stderr[-2000:])
        assert record.last_step == resumable_step, point
        if point == "checkpoint_write":  # the half-written file stayed under a temporary name, and is refused
            assert len(record.half_written) == 1
            (tmp_path / "half.ckpt").write_bytes(record.half_written[0])
            with pytest.raises(ValueError, match="truncated or damaged"):
                read_checkpoint(tmp_path / "half.ckpt")


def check_equal_to_reference(chain, reference) -> None:
    assert chain.final_code == 0
    assert not list(checkpoints(chain.folder).glob(".*.tmp"))  # the next good write cleared the stale temporary
    done, expected = (read_checkpoint(checkpoints(f) / "last.ckpt") for f in (chain.folder, reference))
    assert done["global_step"] == expected["global_step"] == 8
    assert done["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        got = done["state_dict"][name]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, name
    for artifact in ("selection.safetensors", "delta.safetensors"):
        got, want = (load_file(f / "runs" / "debug" / artifact) for f in (chain.folder, reference))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), artifact


def test_struck_runs_die_and_leave_the_previous_checkpoint(ci_chain, tmp_path):
    check_strikes(ci_chain, CI_CHAIN, tmp_path)


def test_resumed_chain_equals_the_uninterrupted_run(ci_chain, reference):
    check_equal_to_reference(ci_chain, reference)


def test_sigterm_during_validation_saves_a_checkpoint_that_resumes_to_the_uninterrupted_run(
    reference, train_file, tmp_path, capsys
):
    """In-process: the SIGTERM lands in the first validation batch after step 4 (validation every 4 steps)."""
    assert main(fit_args(train_file, *strike(4, "validation"))) == 143
    (stop,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smt: stopped")]
    assert stop.startswith("smt: stopped by SIGTERM at step 4; resume with --ckpt_path") and "last.ckpt" in stop
    assert read_checkpoint(checkpoints(tmp_path) / "last.ckpt")["global_step"] == 4
    final_code = main(fit_args(train_file, "--ckpt_path=last"))
    check_equal_to_reference(SimpleNamespace(folder=tmp_path, final_code=final_code), reference)


@pytest.mark.slow
def test_five_strikes_including_regrowth_resume_to_the_uninterrupted_run(reference, train_file, tmp_path):
    (tmp_path / "chain").mkdir()
    chain = run_chain(tmp_path / "chain", train_file, SLOW_CHAIN)
    check_strikes(chain, SLOW_CHAIN, tmp_path)
    check_equal_to_reference(chain, reference)


def test_full_warmup_chain_resumes_to_the_uninterrupted_run(train_file, tmp_path):
    """Struck inside the dense warm-up, in its last step's checkpoint write, and after it: the same weights."""
    reference = uninterrupted_run(Path(tmp_path / "reference"), train_file, *FULL_WARMUP)
    (tmp_path / "chain").mkdir()
    chain = run_chain(tmp_path / "chain", train_file, FULL_WARMUP_CHAIN, tuple(FULL_WARMUP))
    check_strikes(chain, FULL_WARMUP_CHAIN, tmp_path)
    check_equal_to_reference(chain, reference)
    warm = read_checkpoint(checkpoints(tmp_path / "chain") / "last.ckpt")["optimizer_states"][0]
    assert len(warm["state"]) == len(warm["param_groups"][0]["params"])  # resumed after selection: dense state freed


def test_a_damaged_checkpoint_is_refused_on_resume(reference, train_file, tmp_path, capsys):
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray((checkpoints(reference) / "step=4.ckpt").read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    for path in (damaged, truncated):
        assert main(fit_args(train_file, f"--ckpt_path={path}")) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smt: error:")]
        assert len(errors) == 1 and "truncated or damaged" in errors[0] and str(path) in errors[0]


def test_out_of_disk_while_checkpointing_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    from smt.core.io import WriteFailedError

    target = tmp_path / "last.ckpt"
    target.write_bytes((checkpoints(reference) / "step=4.ckpt").read_bytes())
    before = target.read_bytes()

    def full_disk(checkpoint, temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    checkpoint_io = AtomicCheckpointIO()
    monkeypatch.setattr(checkpoint_io, "write_payload", full_disk)
    with pytest.raises(WriteFailedError, match="No space left on device.*previous one is intact") as caught:
        checkpoint_io.save_checkpoint(read_checkpoint(target), target)
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

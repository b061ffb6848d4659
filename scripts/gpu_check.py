"""One GPU check: the GPU tests, the block kernels against dense GEMMs, and training steps of every method.

On a lent GPU (one H100/H200; budgeted to end within 8 minutes), from the repository root:

    set -o pipefail; export PYTHONPATH=. PYTHONUNBUFFERED=1
    timeout 560 python3 scripts/gpu_check.py --out $OUT 2>&1 | tee $OUT/run.log

On CPU, the same code paths on tiny shapes with Triton in its interpreter (about 35 s on 2 cores; the numbers
mean nothing, the run only proves the script works; ``tests/integration/test_gpu_check.py`` runs it):

    python scripts/gpu_check.py --dry-run --out runs/gpu_check

Phases, in order, each under its own time budget (a phase that runs out stops and the next one starts):

1. ``pytest``: ``pytest tests/gpu`` in a subprocess (Triton kernels vs the reference in bf16/fp16/fp32, ragged
   shapes, strips; DDP/FSDP2 on one rank); per test function: passed / failed / skipped.
2. ``kernels``: block dW vs a dense GEMM on the same tiles, fused block scores vs a dense dW, the grouped delta
   matmul vs materialise + dense (``gpu_check_kernels.py``).
3. ``train``: a random ~1.1B Llama in bf16-mixed at 512×8 and 2048×2 tokens: full FT, LoRA (peft) and SMT
   with the torch and the Triton kernels, at LoRA r=8's trainable budget (``gpu_check_train.py``).
4. ``multi_gpu``: the distributed GPU tests over every GPU; skipped in one line with fewer than 2.
5. ``quantized``: whether bitsandbytes runs an nf4 layer; skipped in one line where it does not import.

Every finished row is written at once: ``$OUT/summary.md`` (versions, the command, every table, each target
with its margin) and ``$OUT/results.json`` (the same, raw), plus ``$OUT/pytest_gpu.log``. A phase that fails is
recorded and the next phase runs; the exit status is 1 if any phase failed or ran out of time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gpu_check_kernels import KernelSizes, run_kernels
from gpu_check_report import Report
from gpu_check_train import TrainSizes, run_training

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("pytest", "kernels", "train", "multi_gpu", "quantized")
BUDGET_S = {"pytest": 180, "kernels": 90, "train": 170, "multi_gpu": 120, "quantized": 30}
"""Seconds per phase on a GPU: the first three sum to 440 s, leaving imports and start-up inside 8 minutes on one GPU
(``multi_gpu`` runs only where there are several)."""
DRY_RUN_BUDGET_S = {"pytest": 60, "kernels": 60, "train": 90, "multi_gpu": 30, "quantized": 30}
PACKAGES = ("torch", "triton", "transformers", "lightning", "peft", "bitsandbytes", "pytest")
GRACE_S = 20
"""How long past its budget a phase may run before it is interrupted (its loops stop themselves at the budget)."""


@dataclass(frozen=True)
class Settings:
    """What one run does: where, which phases, how large, how long."""

    out: Path
    dry_run: bool
    phases: tuple[str, ...]
    kernels: KernelSizes
    train: TrainSizes
    budget_s: dict[str, float]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")


def parse_settings(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"), help="folder for the tables")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: mere smoke")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run, in order")
    args = parser.parse_args(argv)
    return Settings(
        out=Path(args.out),
        dry_run=args.dry_run,
        phases=tuple(p for p in PHASES if p in args.phases),
        kernels=KernelSizes.dry_run() if args.dry_run else KernelSizes.gpu(),
        train=TrainSizes.dry_run() if args.dry_run else TrainSizes.gpu(),
        budget_s=DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S,
    )


# --- where it runs ---------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter here (from metadata: nothing is imported)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine(settings: Settings) -> dict:
    """The GPU (name, capability, memory, count), or the CPU for a dry run."""
    if settings.dry_run:
        capability = torch.backends.cpu.get_cpu_capability()
        return {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {capability})"}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
            "gpus": torch.cuda.device_count()}  # fmt: skip


# --- running phases ----------------------------------------------------------------------------------------


class PhaseTimeout(BaseException):
    """Raised by the alarm when a phase runs past its budget and grace; a ``BaseException``, so that a phase's own
    ``except Exception`` (one arm failing must not stop the others) cannot swallow it."""


def _on_alarm(signum, frame) -> None:
    raise PhaseTimeout


Deadline = Callable[[], float]
"""Seconds left in the running phase's budget (negative once it is spent)."""


def run_phase(name: str, body: Callable[[Deadline], tuple[str, str]], budget_s: float, report: Report) -> str:
    """Run one phase under its budget and record its status; never raises (the next phase must run)."""
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s + GRACE_S)
    entry: dict = {"phase": name, "budget_s": budget_s}
    try:
        entry["status"], entry["note"] = body(lambda: budget_s - (time.perf_counter() - start))
    except PhaseTimeout:
        entry["status"], entry["note"] = "timeout", f"interrupted {GRACE_S} s past its {budget_s:.0f} s budget"
    except Exception as err:
        entry["status"], entry["note"] = "failed", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        entry["traceback"] = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    entry["seconds"] = time.perf_counter() - start
    report.phase(entry)
    print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.0f} s. {entry['note']}", flush=True)
    return entry["status"]


def outcome(problems: list[str]) -> tuple[str, str]:
    return ("failed", " | ".join(problems)) if problems else ("ok", "")


# --- the phases -------------------------------------------------------------------------------------------

PYTEST_LINE = re.compile(r"^(tests/\S+?\.py)::([^\s\[]+)(\[\S*\])? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def run_pytest(paths: list[str], log: Path, env: dict[str, str], timeout_s: float) -> tuple[list[dict], list[str]]:
    """``pytest -v paths`` in a subprocess (its own process group, killed whole at ``timeout_s``).

    Returns:
        One row per test function (counts of each outcome) and one line per failure, error or timeout.
    """
    command = [sys.executable, "-m", "pytest", *paths, "-v", "-p", "no:cacheprovider", "-rfE"]
    late = None
    with log.open("w") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        # A session of its own, so that a timeout kills the tests' own subprocesses (DDP ranks) too.
        child = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            child.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            late = f"pytest stopped at the phase's {timeout_s:.0f} s budget"
        finally:  # also when the phase's alarm interrupts the wait
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    rows, failures, summary = parse_pytest_log(log.read_text(errors="replace"))
    problems = [f"{len(failures)} failed: {', '.join(failures[:8])}"] if failures else []
    if late:
        problems.append(late)
    elif child.returncode not in (0, 5) and not failures:  # 5: nothing collected
        problems.append(f"pytest exited {child.returncode}: {summary or 'see the log'}")
    return rows, problems


def parse_pytest_log(text: str) -> tuple[list[dict], list[str], str]:
    """From ``pytest -v`` output: outcome counts per test function, the failing test ids, the final summary line."""
    counts: dict[tuple[str, str], dict] = {}
    failures = []
    for line in text.splitlines():
        match = PYTEST_LINE.match(line)
        if not match:
            continue
        path, test, params, result = match.groups()
        row = counts.setdefault((path, test), {"file": path, "test": test, "passed": 0, "failed": 0, "skipped": 0,
                                               "error": 0})  # fmt: skip
        row[result.lower()] = row.get(result.lower(), 0) + 1
        if result in ("FAILED", "ERROR"):
            failures.append(f"{test}{params or ''} {result}")
    summaries = [
        line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|no tests ran)\b.* in ", line)
    ]
    return list(counts.values()), failures, summaries[-1].strip("= ") if summaries else ""


def pytest_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: the checkout first on ``PYTHONPATH``; compiled Triton on a GPU."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not settings.dry_run:
        env["TRITON_INTERPRET"] = "0"  # tests/conftest.py defaults it to 1 only where there is no CUDA device
    return env


def pytest_phase(settings: Settings, report: Report, deadline: Deadline) -> tuple[str, str]:
    rows, problems = run_pytest(["tests/gpu"], settings.out / "pytest_gpu.log", pytest_env(settings), deadline())
    for row in rows:
        report.record("pytest", row)
    if not rows:
        problems.append("no test results in pytest_gpu.log")
    return outcome(problems)


def multi_gpu_phase(settings: Settings, report: Report, deadline: Deadline) -> tuple[str, str]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return "skipped", f"needs ≥ 2 GPUs; this machine has {count}"
    env = pytest_env(settings, {"SMT_GPUS": str(count)})
    rows, problems = run_pytest(["tests/gpu/test_distributed_gpu.py"], settings.out / "pytest_multi_gpu.log", env,
                                deadline())  # fmt: skip
    for row in rows:
        report.record("multi_gpu", {**row, "gpus": count})
    return outcome(problems)


def quantized_phase(settings: Settings, report: Report, deadline: Deadline) -> tuple[str, str]:
    from smt.core.quant import require_bitsandbytes

    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a native library that does not load
        why = f"bitsandbytes does not import ({type(err).__name__})"
        return "skipped", f"{why}: quantized bases and 8-bit optimizers are not checked"
    module = require_bitsandbytes("nf4", settings.device)
    return "ok", f"bitsandbytes {module.__version__} runs an nf4 layer on {settings.device.type}"


def kernels_phase(settings: Settings, report: Report, deadline: Deadline) -> tuple[str, str]:
    return outcome(run_kernels(settings.kernels, settings.device, report.record, deadline))


def train_phase(settings: Settings, report: Report, deadline: Deadline) -> tuple[str, str]:
    return outcome(run_training(settings.train, settings.device, report.record, deadline))


PHASE_BODIES = {"pytest": pytest_phase, "kernels": kernels_phase, "train": train_phase,
                "multi_gpu": multi_gpu_phase, "quantized": quantized_phase}  # fmt: skip


# --- main -------------------------------------------------------------------------------------------------


def refuse(settings: Settings) -> str | None:
    """Why this run cannot start here, or None."""
    if settings.dry_run:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device here; `--dry-run` runs the same code paths on CPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 would time the Triton interpreter on the GPU; unset it"
    return None


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    if settings.dry_run:  # before any Triton kernel is defined: on CPU Triton runs only in its interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    reason = refuse(settings)
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    settings.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    header = {"mode": "dry-run" if settings.dry_run else "gpu", "command": shlex.join([sys.executable, *sys.argv]),
              "cwd": os.getcwd(), "machine": machine(settings), "versions": versions(),
              "triton_interpret": os.environ.get("TRITON_INTERPRET")}  # fmt: skip
    report = Report(settings.out, header)
    print(f"[gpu_check] {header['mode']} on {header['machine']['device']}; {header['versions']}", flush=True)
    statuses = [run_phase(name, lambda deadline, name=name: PHASE_BODIES[name](settings, report, deadline),
                          settings.budget_s[name], report) for name in settings.phases]  # fmt: skip
    print("\n" + report.targets_markdown() + "\n\n" + report.phases_markdown())
    print(f"\n[gpu_check] wrote {settings.out / 'summary.md'} and {settings.out / 'results.json'}")
    return 1 if any(status in ("failed", "timeout") for status in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())

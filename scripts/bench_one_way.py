"""What issue 17's "one way to do each thing" mends saved: host syncs per step, tile scatter/gather time, delta-file
reads, bytes held by ``smt merge``. CPU, seconds to a minute each:

    python scripts/bench_one_way.py syncs [--devices 2] [--precision 16-mixed]   # smt's reductions/host reads per step
    python scripts/bench_one_way.py tiles [--against 63f3bc2]                    # BlockGrid gather/scatter_ ms
    python scripts/bench_one_way.py lora                                          # export_lora_from_file: file reads
    python scripts/bench_one_way.py fuse                                          # smt merge: bytes held, peak RSS

It imports smt's *old* module paths (``smt.blocks``, ``smt.guards``, …: aliases since issue 17) on purpose, so the
same file measures the commit before the mends and this tree: check out the base, run, check out the branch, run.
``tiles --against COMMIT`` instead loads that commit's ``smt/blocks.py`` beside the current one and times both,
interleaved in one process (the machine is shared: one thread, the fastest of many runs).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import smt

SMT_DIR = str(Path(smt.__file__).parent)


def best_ms(fn, repeats: int = 25) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


# --- host syncs per optimizer step -------------------------------------------------------------------------


def smt_caller(within: int = 3) -> str | None:
    """The smt file:line among the first callers of the wrapped method (a torch helper smt called counts too)."""
    frame = sys._getframe(2)
    for _ in range(within):
        if frame is None:
            return None
        if frame.f_code.co_filename.startswith(SMT_DIR):
            return f"{frame.f_code.co_filename[len(SMT_DIR) + 1 :]}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def syncs(options) -> None:
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
    from lightning.pytorch.plugins import MixedPrecision
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from smt.checkpoint_io import PreemptionCheckpoint
    from smt.config import RegrowthConfig
    from smt.guards import NonFiniteGuard

    counts, now = collections.Counter(), {"step": "setup"}

    def counted(owner, method: str, kind: str) -> None:
        original = getattr(owner, method)

        def wrapper(*args, **kwargs):
            if smt_caller() is not None:
                counts[(now["step"], kind)] += 1
            return original(*args, **kwargs)

        setattr(owner, method, wrapper)

    for method in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        counted(torch.Tensor, method, "host reads")

    class Regressor(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))

        def training_step(self, batch, batch_idx):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(int(batch[0]) + 1000 * self.global_rank))
            return torch.nn.functional.mse_loss(self.net(x), torch.sin(x[:, :8]))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)

        def train_dataloader(self):
            return DataLoader(torch.arange(64), batch_size=1)

    class Phases(Callback):
        def setup(self, trainer, pl_module, stage):
            for method in ("reduce", "all_gather"):
                counted(trainer.strategy, method, "reductions")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            phase, step = tuning.phase, trainer.global_step + 1
            if phase == "tuning" and tuning.regrower.in_window(step - tuning.tuning_start):
                phase += ", regrowth window"
            if tuning.progress.due:
                phase += ", progress check due after the last step"
            now["step"] = f"step {step:2d} ({phase})"

        def on_train_end(self, trainer, pl_module):
            lines = [f"{step}: {kind} {n}" for (step, kind), n in sorted(counts.items()) if step.startswith("step")]
            Path(folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(lines))

    seed_everything(0)
    folder = tempfile.mkdtemp()
    tuning = smt.SparseMatrixTuning(
        target_modules=["0", "2"], block_size=8, num_blocks=6, warmup_steps=3, check_progress_after=3,
        regrowth=RegrowthConfig(every=4, accumulate=2, rate=0.5),
    )  # fmt: skip
    fp16 = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if options.precision else None
    Trainer(
        accelerator="cpu", devices=options.devices, max_steps=12, logger=False, enable_progress_bar=False,
        strategy=DDPStrategy(start_method="fork") if options.devices > 1 else "auto", plugins=fp16,
        enable_model_summary=False, enable_checkpointing=False,
        callbacks=[tuning, NonFiniteGuard(), PreemptionCheckpoint(), Phases()],
    ).fit(Regressor())  # fmt: skip
    print(f"devices={options.devices} precision={options.precision or '32'}: smt's calls per optimizer step "
          "(step 3 selects, 7 and 11 are regrowth events: their score reductions are the work itself)")  # fmt: skip
    print("\n".join(json.loads(Path(folder, "rank0.json").read_text())))


# --- tiles -------------------------------------------------------------------------------------------------


def tiles(options) -> None:
    from smt.blocks import BlockGrid

    torch.set_num_threads(1)
    torch.manual_seed(0)
    grids = {"now": BlockGrid}
    if options.against:
        source = subprocess.run(
            ["git", "show", f"{options.against}:smt/blocks.py"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        folder = Path(tempfile.mkdtemp())
        (folder / "blocks_then.py").write_text(source.stdout)
        sys.path.insert(0, str(folder))
        grids = {options.against: importlib.import_module("blocks_then").BlockGrid, "now": BlockGrid}
    for out_f, in_f, block, k in [(4096, 4096, 256, 16), (4096, 4096, 64, 400), (4100, 4090, 64, 400)]:
        geometry = BlockGrid(out_f, in_f, block, block)
        index = geometry.all_blocks()[torch.randperm(geometry.num_blocks)[:k]]
        weight, stored_t, values = torch.randn(out_f, in_f), torch.randn(in_f, out_f), torch.randn(k, block, block)
        row = []
        for op, args in [("gather", (weight, index)), ("gather", (stored_t.t(), index)),
                         ("scatter_", (weight, index, values)), ("scatter_add_", (weight, index, values))]:  # fmt: skip
            best = {name: [] for name in grids}
            for _ in range(5):  # interleaved rounds
                for name, kind in grids.items():
                    grid = kind(out_f, in_f, block, block)
                    best[name].append(best_ms(lambda grid=grid, op=op, args=args: getattr(grid, op)(*args)))
            label = op + (" .t()" if args[0] is not weight else "")
            row.append(f"{label} " + " → ".join(f"{min(times):.2f}" for times in best.values()) + " ms")
        print(f"{out_f}×{in_f}, {block}² blocks, k={k}: " + "; ".join(row))


# --- delta files -------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    config._attn_implementation, config._name_or_path = "eager", "tiny"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def write_delta(folder: Path, density: float, seed: int) -> Path:
    """A random selection of the budget's size with small random Δ, saved in fp32."""
    from smt.config import SMTConfig
    from smt.delta import save_delta
    from smt.model import apply_selection, inject, sparse_layers
    from smt.selection import Selection

    model = tiny_llama()
    bank = inject(model, SMTConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], block_size=32,
                                   density=density))  # fmt: skip
    grids = {name: layer.grid for name, layer in sparse_layers(model).items()}
    candidates = [(name, block) for name, grid in grids.items() for block in grid.all_blocks().tolist()]
    generator = torch.Generator().manual_seed(seed)
    blocks: dict = {}
    for position in torch.randperm(len(candidates), generator=generator)[: bank.capacity].tolist():
        blocks.setdefault(candidates[position][0], []).append(candidates[position][1])
    apply_selection(model, Selection({name: torch.tensor(b) for name, b in blocks.items()}, grids))
    with torch.no_grad():
        for slot in bank.slots:
            slot.normal_(0, 1e-3, generator=generator)
    return save_delta(model, folder / f"delta{seed}.safetensors", base_model_id="tiny", dtype="float32")


def lora(options) -> None:
    import safetensors

    from smt.delta import read_delta
    from smt.lora_export import export_lora_from_file

    path = write_delta(Path(tempfile.mkdtemp()), 0.05, seed=1)
    reads, original = [0], safetensors.safe_open
    new_layout = importlib.util.find_spec("smt.core") is not None
    io_module = importlib.import_module("smt.core.io" if new_layout else "smt.io")  # where the reader lives
    io_module.safe_open = lambda *args, **kwargs: reads.__setitem__(0, reads[0] + 1) or original(*args, **kwargs)
    export_lora_from_file(tiny_llama(), path, Path(tempfile.mkdtemp()), rank=8)
    count = reads[0]
    each = best_ms(lambda: read_delta(path), repeats=9)
    print(f"export_lora_from_file: {count} read(s) of the delta file ({path.stat().st_size / 2**20:.1f} MiB), "
          f"{each:.0f} ms to read and validate it once")  # fmt: skip


def proc_status_kib(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1])


def fuse(options) -> None:
    import ctypes
    import gc

    from smt.export import fuse_deltas_

    folder = Path(tempfile.mkdtemp())
    paths = [write_delta(folder, 0.25, seed) for seed in (1, 2)]
    model = tiny_llama()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    fuse_deltas_(model, paths, [0.5, 0.5], "")
    seconds = time.perf_counter() - start
    print(f"smt merge of 2 fp32 deltas ({sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB on disk): peak RSS "
          f"+{(proc_status_kib('VmHWM') - before) / 1024:.1f} MiB, {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["syncs", "tiles", "lora", "fuse"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", choices=["16-mixed"], default=None)
    parser.add_argument("--against", help="a commit whose smt/blocks.py to time beside this one (tiles)")
    options = parser.parse_args()
    {"syncs": syncs, "tiles": tiles, "lora": lora, "fuse": fuse}[options.what](options)

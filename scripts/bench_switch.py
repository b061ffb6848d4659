"""Time to switch the active adapter in place: DeltaSet (sparse scatter) vs LoRA merge/unmerge of equal size.

    python scripts/bench_switch.py [--models tiny smollm2] [--density 0.01] [--block 64] [--repeats 50]

Both adapters train the same number of parameters on the same modules: the SMT delta holds K blocks of
``bo × bi``; the LoRA rank r is chosen so that ``Σ r·(out + in) ≈ K·bo·bi``. A switch A → B is

- DeltaSet: ``activate("b")`` (restore A's saved W0 values, write ``W0 + Δ_B`` at B's positions);
- LoRA (torch): ``W −= B_A·A_A`` then ``W += B_B·A_B`` for every module (two GEMMs of the weight's size);
- LoRA (peft): ``unmerge_adapter(); set_adapter("b"); merge_adapter()`` on a ``PeftModel``.

Reported: median over ``--repeats`` switches after ``--warmup`` ones (alternating A and B). SmolLM2-135M is
used when ``artifacts/models/SmolLM2-135M-Instruct`` exists (``python scripts/prepare_smollm2.py``), else skipped.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import tiny_llama

from smt import Selection, apply_selection, save_delta
from smt.adapters.deltaset import DeltaSet
from smt.core.model import find_targets, get_bank, linear_geometry, module_grids
from smt.lightning.pretrained import DEFAULT_SMOLLM2_DIR, is_converted


def build_model(name: str, dtype: torch.dtype, device: str):
    """The tiny random Llama of the CPU tests (hidden 256, 4 layers), or SmolLM2-135M from its local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "tiny":
        config = AutoConfig.for_model(**tiny_llama("medium", vocab_size=1024))
        return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    if not is_converted(DEFAULT_SMOLLM2_DIR):
        return None
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_SMOLLM2_DIR, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def random_delta(model, targets, block: int, density: float, seed: int, path: Path) -> tuple[Path, int]:
    """A delta file of random blocks (``density`` of the targeted blocks), random Δ; returns its parameter count."""
    generator = torch.Generator().manual_seed(seed)
    grids = module_grids(find_targets(model, targets), block)
    choices = [(name, int(flat)) for name, grid in grids.items() for flat in range(grid.num_blocks)]
    k = max(1, round(density * sum(g.num_blocks for g in grids.values())))
    picked = [choices[int(i)] for i in torch.randperm(len(choices), generator=generator)[:k]]
    index = {name: torch.tensor([divmod(f, g.n_col_blocks) for n, f in picked if n == name], dtype=torch.long)
             .reshape(-1, 2) for name, g in grids.items()}  # fmt: skip
    tuning = apply_selection(copy.deepcopy(model), Selection(index, grids))
    with torch.no_grad():
        for slot in get_bank(tuning).slots:
            slot.copy_(0.01 * torch.randn(slot.shape, generator=generator))
    save_delta(tuning, path, dtype="float32")
    return path, k * block * block


def lora_rank(model, targets, params: int) -> tuple[int, int]:
    """The rank whose LoRA on ``targets`` has about ``params`` parameters, and its exact count."""
    sizes = [sum(linear_geometry(m)[:2]) for m in find_targets(model, targets).values()]
    rank = max(1, round(params / sum(sizes)))
    return rank, rank * sum(sizes)


def median_ms(switch, repeats: int, warmup: int, device: str) -> float:
    """Median wall time of ``switch(step)`` in milliseconds, synchronised on CUDA."""
    times = []
    for step in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        switch(step)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_deltaset(model, paths, repeats, warmup, device) -> float:
    deltas = DeltaSet(model, "")
    for name, path in zip("ab", paths):
        deltas.add(name, path)
    deltas.activate("a")
    result = median_ms(lambda step: deltas.activate("ab"[(step + 1) % 2]), repeats, warmup, device)
    deltas.deactivate()
    return result


@torch.no_grad()
def time_lora_torch(model, targets, rank, repeats, warmup, device) -> float:
    """``W −= B_A·A_A; W += B_B·A_B`` per module (``[out, in]`` Linear weights)."""
    generator = torch.Generator().manual_seed(0)
    weights = [m.weight for m in find_targets(model, targets).values()]
    factors = [[(0.01 * torch.randn(w.shape[0], rank, generator=generator)).to(w),
                (0.01 * torch.randn(rank, w.shape[1], generator=generator)).to(w)]
               for _ in "ab" for w in weights]  # fmt: skip
    per = len(weights)
    for w, (b, a) in zip(weights, factors[:per]):
        w.addmm_(b, a)

    def switch(step):
        old, new = (factors[:per], factors[per:]) if step % 2 == 0 else (factors[per:], factors[:per])
        for w, (b_old, a_old), (b_new, a_new) in zip(weights, old, new):
            w.addmm_(b_old, a_old, alpha=-1)
            w.addmm_(b_new, a_new)

    return median_ms(switch, repeats, warmup, device)


def time_lora_peft(model, targets, rank, repeats, warmup, device) -> float | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name="a")
    peft_model.add_adapter("b", config)
    peft_model.to(device)
    peft_model.merge_adapter(["a"])

    def switch(step):
        peft_model.unmerge_adapter()
        peft_model.merge_adapter(["b" if step % 2 == 0 else "a"])

    return median_ms(switch, repeats, warmup, device)


def bench(name: str, args) -> str | None:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(name, dtype, args.device)
    if model is None:
        print(f"{name}: skipped ({DEFAULT_SMOLLM2_DIR} is missing; run `python scripts/prepare_smollm2.py`)")
        return None
    with tempfile.TemporaryDirectory() as folder:
        made = [random_delta(model, args.targets, args.block, args.density, seed, Path(folder) / f"{seed}.safetensors")
                for seed in (1, 2)]  # fmt: skip
        params = made[0][1]
        rank, lora_params = lora_rank(model, args.targets, params)
        sparse = time_deltaset(model, [p for p, _ in made], args.repeats, args.warmup, args.device)
    dense = time_lora_torch(model, args.targets, rank, args.repeats, args.warmup, args.device)
    peft = None if args.no_peft else time_lora_peft(model, args.targets, rank, args.repeats, args.warmup, args.device)
    peft_cell = "–" if peft is None else f"{peft:.3f}"
    return (f"| {name} | {args.dtype} | {params:,} ({args.block}² blocks) | r={rank} ({lora_params:,}) | "
            f"{sparse:.3f} | {dense:.3f} | {peft_cell} | {dense / sparse:.0f}× |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--block", type=int, default=64, help="SMT block size (square)")
    parser.add_argument("--density", type=float, default=0.01, help="share of the targeted blocks in each delta")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no_peft", action="store_true", help="skip the PEFT merge_adapter/unmerge_adapter column")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = [row for name in args.models if (row := bench(name, args)) is not None]
    print(f"\nswitch A → B, median of {args.repeats} after {args.warmup} warm-up, device {args.device}, "
          f"targets {' '.join(args.targets)}\n")  # fmt: skip
    print("| model | dtype | SMT Δ params | LoRA rank (params) | DeltaSet ms | LoRA torch ms | LoRA peft ms "
          "| LoRA torch ÷ DeltaSet |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

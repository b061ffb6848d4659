"""Peak CPU memory of SMT training: fp32 vs nf4 vs int8 base, AdamW vs AdamW8bit for the blocks.

    python scripts/bench_memory.py                 # tiny Llama and SmolLM2-135M (prepared if missing), ~3-5 min
    python scripts/bench_memory.py --models tiny   # seconds

Each configuration runs in a fresh subprocess (no allocator reuse between them). Method: after every
import, the worker reads its resident set (VmRSS) as the baseline; it loads the base, copies its tensors
out of the checkpoint's memory map (``own_memory``: the same accounting for every base), trims the heap
(``malloc_trim``) and reads VmRSS again (the resident model); it then resets the peak counter (writes 5
to ``/proc/self/clear_refs``), runs a few training steps of the SMT blocks (fixed random selection, no
warm-up) and reads the peak (VmHWM). Reported: resident model and training peak, both minus the
baseline, plus exact byte counts of the base's weights, the trainable slots and the optimizer state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import proc_status_kib, release_free_heap, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
BASES = ("fp32", "nf4", "int8")
OPTIMIZERS = ("adamw", "adamw8bit")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = tiny_llama("medium", intermediate_size=1024, vocab_size=1024)


def load_base(model: str, base: str):
    """The base model: a random tiny Llama (quantized after construction) or SmolLM2-135M from its folder."""
    from smt.lightning.module import load_causal_lm

    quantization = "none" if base == "fp32" else base
    if model == "tiny":
        return load_causal_lm(None, TINY, "float32", "eager", quantization)
    from smt.lightning.pretrained import prepare_smollm2

    folder, _ = prepare_smollm2(ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct")
    return load_causal_lm(str(folder), None, "float32", "eager", quantization)


def worker(model_name: str, base: str, optimizer_name: str, steps: int, tokens: int, density: float) -> dict:
    """One configuration, measured in this (fresh) process; returns the numbers as a dict."""
    import bitsandbytes  # noqa: F401  (imported before the baseline, like everything else)
    import torch
    import transformers  # noqa: F401

    from smt import SMTConfig, apply_selection
    from smt.core.merge import plain_state_dict
    from smt.core.model import inject
    from smt.core.quant import build_optimizer, optimizer_state_bytes, tensor_bytes

    torch.manual_seed(0)
    warm_up(base, optimizer_name)  # lazy imports and one-time allocations land before the baseline
    release_free_heap()
    baseline = proc_status_kib("VmRSS")
    model = load_base(model_name, base)
    model.train()
    own_memory(model)
    release_free_heap()
    resident = proc_status_kib("VmRSS")
    weight_bytes = tensor_bytes(plain_state_dict(model).values())
    config = SMTConfig(target_modules=TARGETS, block_size=64, density=density)
    bank = inject(model, config)
    apply_selection(model, random_selection(model, bank.capacity))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_name, params, 1e-4, (0.9, 0.999), 0.0, "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # peak counter := current RSS
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    start = time.perf_counter()
    for step in range(steps + 1):  # step 0 creates the optimizer state; it is in the peak, not in the time
        if step == 1:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    return {
        "model": model_name, "base": base, "optimizer": optimizer_name,
        "resident_mib": (resident - baseline) / 1024, "train_peak_mib": (proc_status_kib("VmHWM") - baseline) / 1024,
        "weight_mib": weight_bytes / 2**20, "trainable_mib": tensor_bytes(params) / 2**20,
        "optimizer_mib": optimizer_state_bytes(optimizer) / 2**20, "tuned": sum(p.numel() for p in params),
        "step_s": (time.perf_counter() - start) / steps,
    }  # fmt: skip


def own_memory(model) -> None:
    """Copy every tensor into anonymous memory, so the checkpoint's memory map is released.

    ``from_pretrained`` maps the safetensors file: fp32 weights *are* its pages (counted in RSS only once
    touched, i.e. inside the training peak), while quantizing reads every page at load and the kept tensors
    (the tied fp32 embedding) hold the whole map alive — file pages that VmRSS/VmHWM would count for nf4/int8
    and not for fp32. With private copies every base is measured the same way.
    """
    import gc

    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()


def warm_up(base: str, optimizer_name: str) -> None:
    """One training step of a 2-layer tiny model with the same base kind and optimizer, then dropped."""
    import torch

    from smt import SMTConfig, apply_selection
    from smt.core.model import inject
    from smt.core.quant import build_optimizer
    from smt.lightning.module import load_causal_lm

    small = {**TINY, "num_hidden_layers": 1, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 256}
    model = load_causal_lm(None, small, "float32", "eager", "none" if base == "fp32" else base)
    bank = inject(model, SMTConfig(target_modules=TARGETS, block_size=64, num_blocks=2))
    apply_selection(model, random_selection(model, bank.capacity))
    optimizer = build_optimizer(optimizer_name, [p for p in model.parameters() if p.requires_grad], 1e-4,
                                (0.9, 0.999), 0.0, "cpu")  # fmt: skip
    ids = torch.randint(0, 256, (1, 8))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()


def random_selection(model, capacity: int):
    """``capacity`` blocks drawn uniformly over the targeted layers (seeded): memory does not depend on which."""
    import torch

    from smt import Selection
    from smt.core.model import sparse_layers

    grids = {name: layer.grid for name, layer in sparse_layers(model).items()}
    flat = [(name, r, c) for name, g in grids.items() for r in range(g.n_row_blocks) for c in range(g.n_col_blocks)]
    chosen = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:capacity].tolist()
    blocks = {name: [] for name in grids}
    for i in sorted(chosen):
        name, r, c = flat[i]
        blocks[name].append([r, c])
    return Selection({n: torch.tensor(b, dtype=torch.long).view(-1, 2) for n, b in blocks.items()}, grids)


def run_all(models: list[str], steps: int, tokens: int, density: float) -> list[dict]:
    rows = []
    for model in models:
        for base in BASES:
            for optimizer in OPTIMIZERS:
                args = [sys.executable, __file__, "--worker", model, base, optimizer]
                args += ["--steps", str(steps), "--tokens", str(tokens), "--density", str(density)]
                out = subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(f"{model}/{base}/{optimizer} failed:\n{out.stderr[-2000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  measured {model} {base} {optimizer}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | base | optimizer | base weights MiB | tuned weights | slots MiB | optimizer state MiB "
            "| resident model MiB | training peak MiB | s/step |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base']} | {r['optimizer']} | {r['weight_mib']:.1f} | {r['tuned']:,} | "
            f"{r['trainable_mib']:.2f} | {r['optimizer_mib']:.2f} | {r['resident_mib']:.0f} | "
            f"{r['train_peak_mib']:.0f} | {r['step_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    parser.add_argument("--tokens", type=int, default=64, help="sequence length (batch 1)")
    parser.add_argument("--density", type=float, default=0.05, help="fraction of the targeted weights tuned")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "BASE", "OPTIMIZER"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(worker(*options.worker, options.steps, options.tokens, options.density)))
        return 0
    print(markdown(run_all(options.models, options.steps, options.tokens, options.density)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

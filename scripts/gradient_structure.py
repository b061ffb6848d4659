"""Why LoRA beats sparse blocks at equal budget here: how much of the fine-tuning gradient each shape can follow.

    python scripts/gradient_structure.py --task alpaca                # SmolLM2-135M, q/k/v, LoRA r=8's budget
    python scripts/gradient_structure.py --task gsm8k --targets all --budget r32

For a budget of P trainable weights (LoRA r's exact count on the targets), a step confined to a set S of
weights lowers the loss at first order by what S holds of

- ``Σ G²`` for an SGD step;
- ``Σ |G|`` for a sign step (Adam's first steps: every weight moves by ~lr whatever its gradient's scale);
- ``Σ Ḡ²/√F`` for a settled Adam step (``m/√v``: the mean gradient over its root mean square);
- ``Σ Ḡ²/F`` for a diagonal-Newton step, F = the mean squared batch gradient (the empirical Fisher): the gain
  a well-preconditioned optimiser can take, which no longer grows with an input channel's scale, because the
  curvature grows with it too.

The script takes the gradient of the target weights on the first ``--warmup`` batches of the quality study's
training order (what SMT's warm-up sees), chooses blocks from them, and measures each structure's share of the
four sums on the *next* ``--later`` batches (what the tuning steps then follow):

- rank r per module (LoRA r's reach: the top-r singular directions of each module's gradient; Σ G² only);
- the best P single weights (any sparse mask's ceiling);
- K = P / side² blocks: chosen by ``grad_sq`` on the warm-up, by a scale-free batch SNR (mean over the block
  of |Σ_b G_b| / √Σ_b G_b², ``grad_snr``'s idea at batch level) on the warm-up, the best by each sum on the
  measured batches themselves (oracles), and random (mean of 20 draws).

A first-order picture of the first steps only, but it separates what a structure can reach from how well the
warm-up picks. Prints a markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_tasks  # noqa: E402  (the study's model, data splits and training order)
from harness import language_model  # noqa: E402


def gradients(task: str, targets: list[str], seed: int, warmup: int, later: int, batch_size: int):
    """Per target module: each warm-up batch's gradient (``grad_sq`` scores are built from them), and the sum and
    the sum of squares of the gradients of the batches after them."""
    from smt.core.model import find_targets
    from smt.data.loss import labelled_positions_loss
    from smt.lightning.datamodule import InstructionDataModule
    harness = quality_tasks.Harness()
    module = language_model(harness.model, None, None, seed)
    model = module.model.train()
    weights = {name: m.weight for name, m in find_targets(model, targets).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    path = harness.work / "splits" / task / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(quality_tasks.TASKS[task](harness.data_root, harness)["train"]))
    data = InstructionDataModule(
        train_path=str(path), batch_size=batch_size, max_length=harness.max_length,
        limit_train=100 * batch_size, seed=seed, cache_dir=str(harness.work / "cache"),
    )  # fmt: skip
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    late = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    late_sq = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    per_batch: list[dict[str, torch.Tensor]] = []
    for step, batch in enumerate(data.train_dataloader()):
        if step == warmup + later:
            break
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        loss = labelled_positions_loss(model, inputs)
        grads = torch.autograd.grad(loss, list(weights.values()))
        if step < warmup:
            per_batch.append({n: g.float() for n, g in zip(weights, grads, strict=True)})
        else:
            for name, g in zip(weights, grads, strict=True):
                late[name] += g.float()
                late_sq[name] += g.float().square()
        print(f"gradient_structure: batch {step + 1}/{warmup + later} loss {float(loss.detach()):.4f}", flush=True)
    return late, late_sq, per_batch


def block_sum(values: torch.Tensor, side: int) -> torch.Tensor:
    """``[n_rb, n_cb]`` sum of ``values`` over each ``side``² block (ragged edges included)."""
    rows, cols = values.shape
    pad = torch.nn.functional.pad(values, (0, -cols % side, 0, -rows % side))
    return pad.reshape(pad.shape[0] // side, side, pad.shape[1] // side, side).sum((1, 3))


def shares(late, late_sq, per_batch, later: int, budget: int, rank: int, sides: tuple[int, ...],
           draws: int = 20) -> dict:  # fmt: skip
    """Per structure: its share of the later gradient's Σ G², Σ |G|, Σ Ḡ²/√F and Σ Ḡ²/F (see the module
    docstring); the rank structure has only the first (the other steps are not confined to a subspace)."""
    tiny = torch.finfo(torch.float32).tiny
    views = {"sq": {n: g.square() for n, g in late.items()}, "abs": {n: g.abs() for n, g in late.items()},
             "adam": {n: late[n].square() / (later * late_sq[n]).sqrt().clamp_min(tiny) for n in late},
             "newton": {n: late[n].square() / (later * late_sq[n]).clamp_min(tiny) for n in late}}  # fmt: skip
    totals = {v: sum(float(t.sum()) for t in per.values()) for v, per in views.items()}
    svd = sum(float(torch.linalg.svdvals(g)[:rank].square().sum()) for g in late.values())
    out = {"rank": (svd / totals["sq"], None, None, None)}
    flat = {v: torch.cat([t.flatten() for t in per.values()]) for v, per in views.items()}
    out["top weights"] = tuple(float(flat[v].topk(budget).values.sum()) / totals[v] for v in views)
    generator = torch.Generator().manual_seed(0)
    warm_snr = {n: sum(b[n] for b in per_batch).abs() / sum(b[n].square() for b in per_batch).sqrt().clamp_min(tiny)
                for n in late}  # fmt: skip
    for side in sides:
        k = max(1, round(budget / side**2))
        blocks = {v: torch.cat([block_sum(t, side).flatten() for t in per.values()]) for v, per in views.items()}
        snr = torch.cat([block_sum(warm_snr[n], side).flatten() for n in late])
        scores = torch.cat([sum(block_sum(b[n].square(), side) for b in per_batch).flatten() for n in late])
        picks = {"grad_sq blocks": scores.topk(k).indices, "batch-SNR blocks": snr.topk(k).indices}
        picks |= {f"best blocks by {v}": blocks[v].topk(k).indices for v in ("sq", "adam", "newton")}
        picks["random blocks"] = [torch.randperm(scores.numel(), generator=generator)[:k] for _ in range(draws)]
        for name, index in picks.items():
            chosen = index if isinstance(index, list) else [index]
            out[f"{name} {side}"] = tuple(
                sum(float(blocks[v][i].sum()) for i in chosen) / len(chosen) / totals[v] for v in views
            )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="alpaca", choices=list(quality_tasks.TASKS))
    parser.add_argument("--targets", default="qkv", choices=list(quality_tasks.TARGETS))
    parser.add_argument("--budget", default="r8", help="r<rank>: LoRA rank whose weight count every shape gets")
    parser.add_argument("--seed", type=int, default=0, help="data order (the quality study's seed)")
    parser.add_argument("--warmup", type=int, default=5, help="batches the blocks are chosen on (SMT's warm-up)")
    parser.add_argument("--later", type=int, default=10, help="batches after them whose gradient is measured")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the shares here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = int(args.budget.removeprefix("r"))
    late, late_sq, per_batch = gradients(args.task, quality_tasks.TARGETS[args.targets], args.seed, args.warmup,
                                       args.later, args.batch_size)  # fmt: skip
    budget = sum(rank * sum(g.shape) for g in late.values())
    result = shares(late, late_sq, per_batch, args.later, budget, rank, sides=(16, 32, 64))
    print(f"\n{args.task}, {args.targets} targets, budget {budget:,} weights (LoRA r={rank}); share of the gradient "
          f"energy of batches {args.warmup + 1}–{args.warmup + args.later} each structure can follow:\n")  # fmt: skip
    print("| structure (equal budget) | Σ G² (SGD) | Σ \\|G\\| (sign) | Σ Ḡ²/√F (Adam) | Σ Ḡ²/F (diagonal Newton) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in result.items():
        label = f"rank {rank} per module (LoRA's reach)" if name == "rank" else name
        print(f"| {label} | " + " | ".join("–" if v is None else f"{v:.1%}" for v in values) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "budget": budget,
                                         "shares": result}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

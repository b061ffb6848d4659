"""The quality report's learning-rate section: SMT's LR curve beside LoRA's, per task and budget.

What a user who keeps the LR they tuned for LoRA gets from SMT (``smt.lr_scale``, issue 24): for every (precision,
task, budget) where LoRA and an SMT arm (the default ``global`` selection, or ``proportional``) each ran three or
more LRs at seed 0, both validation curves, each arm's best LR, SMT's loss at LoRA's best LR against SMT's own best,
and each arm's worst over the common user grid 1e-4 … 3e-3 where both ran all of it; one row per SMT arm.
"""

from __future__ import annotations

import math
import statistics

USER_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
SMT_ARMS = {"smt:grad_sq": "global", "spread:grad_sq": "proportional"}
"""The SMT arms the section sets beside LoRA, by the allocation each uses."""
ARMS = ("lora", *SMT_ARMS)
SCALES_TRIED = (1.0, 1.5, 2.0, 3.0)
"""The ``smt.lr_scale`` values the section prices: SMT at a multiple of the user's LR is the same run as the slots'
param group scaled by it (only the slots train), so scale k's cells are SMT's at k× each grid LR."""


def lr_curves(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``(precision, task, budget, schedule) → arm → {"curve": {lr: val NLL}, "acc": {lr: val accuracy},
    "blocks": n, "seeds": {lr: [metrics]}}`` for runs of ``ARMS`` (curves from seed 0)."""
    sweeps: dict[tuple, dict[str, dict]] = {}
    for r in records:
        c = r["cell"]
        if c["arm"] not in ARMS or c.get("warmup_on_top"):
            continue
        key = (c.get("precision", "32-true"), c["task"], f"{c['targets']}-{c['budget']}", c.get("schedule", "cosine"))
        entry = sweeps.setdefault(key, {}).setdefault(c["arm"], {"curve": {}, "acc": {}, "blocks": None, "seeds": {}})
        entry["seeds"].setdefault(c["lr"], []).append(r["metrics"])
        if c["seed"] == 0:
            entry["curve"][c["lr"]] = r["metrics"]["val_nll"]
            if "val_acc" in r["metrics"]:
                entry["acc"][c["lr"]] = r["metrics"]["val_acc"]
            entry["blocks"] = (r.get("selection") or {}).get("blocks", entry["blocks"])
    return {k: v for k, v in sweeps.items() if _swept(v, "lora") and any(_swept(v, arm) for arm in SMT_ARMS)}


def _swept(arms: dict, arm: str) -> bool:
    """Whether ``arm`` ran three or more LRs at seed 0 (enough for a curve)."""
    return len(arms.get(arm, {}).get("curve", {})) >= 3


def _curve(curve: dict[float, float]) -> str:
    return " · ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(curve.items()))


def mean_std(values: list[float]) -> str:
    """``mean ± std`` to 3 decimals (the mean alone for one value)."""
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def _over_seeds(entry: dict, lr: float) -> str:
    """Val NLL (and new-wording recall where measured) at ``lr`` over every seed run there: mean ± std (n)."""
    runs = entry["seeds"][lr]
    parts = []
    for key, name in (("val_nll", "val NLL"), ("test_recall", "recall")):
        values = [m[key] for m in runs if key in m]
        if values:
            parts.append(f"{name} {mean_std(values)}")
    return ", ".join(parts) + f" ({len(runs)})"


def _grid_points(curve: dict[float, float]) -> list[float] | None:
    """The LRs of ``curve`` at each user-grid LR, or None where one is missing."""
    points = [next((lr for lr in curve if math.isclose(lr, g, rel_tol=1e-6)), None) for g in USER_GRID]
    return None if None in points else points


def _worst_lr(curve: dict[float, float], worst=max) -> float | None:
    """The LR where the seed-0 ``curve`` is worst over the user grid, where it covers all of it."""
    points = _grid_points(curve)
    return None if points is None else worst(points, key=curve.get)


def _seeded(entry: dict, lr: float, key: str) -> str:
    """``key`` at ``lr``: the one run's value, or mean ± std (seeds) where more seeds ran there."""
    values = [m[key] for m in entry["seeds"][lr]]
    return mean_std(values) + (f" ({len(values)})" if len(values) > 1 else "")


def _worst_text(lora: dict, smt: dict) -> str:
    """Each arm's worst val NLL over the user grid (over the seeds run at that LR), and its worst val accuracy
    where the task measures one."""
    lrs = [_worst_lr(lora["curve"]), _worst_lr(smt["curve"])]
    if None in lrs:
        return "–"
    text = " / ".join(_seeded(entry, lr, "val_nll") for entry, lr in zip((lora, smt), lrs))
    acc_lrs = [_worst_lr(lora["acc"], min), _worst_lr(smt["acc"], min)]
    if None in acc_lrs:
        return text
    return text + " (acc " + " / ".join(_seeded(e, lr, "val_acc") for e, lr in zip((lora, smt), acc_lrs)) + ")"


def _scaled_part(smt: dict, scale: float) -> str:
    """SMT's worst (over the seeds run there) / best val NLL over ``scale`` × the user grid, with the worst val
    accuracy where the task has one. Where only part of that grid ran, the worst of what ran is a bound (the whole
    grid's worst can only be worse) and no best is given: enough to rule a multiplier out without running it all."""
    curve, accs = smt["curve"], smt["acc"]
    points = [lr for g in USER_GRID for lr in curve if math.isclose(lr, scale * g, rel_tol=1e-6)]
    off_grid = [lr for lr in points if not any(math.isclose(lr, g, rel_tol=1e-6) for g in USER_GRID)]
    if not points or (len(points) < len(USER_GRID) and not off_grid):
        return "–"  # a part made only of the user grid's own LRs was not run to price this multiple
    worst = max(points, key=curve.get)
    acc_points = [lr for lr in points if lr in accs]
    acc = min(acc_points, key=accs.get) if acc_points else None
    if len(points) < len(USER_GRID):
        acc_text = "" if acc is None else f", acc ≤ {accs[acc]:.3f}"
        return f"≥ {curve[worst]:.3f}{acc_text} ({len(points)} of {len(USER_GRID)} LRs)"
    acc_text = "" if acc is None else f" (acc {_seeded(smt, acc, 'val_acc')})"
    return f"{_seeded(smt, worst, 'val_nll')}{acc_text} / {min(curve[lr] for lr in points):.3f}"


def _scaled_text(smt: dict) -> str:
    """SMT's worst and best over the user grid at each of ``SCALES_TRIED`` (its cells at k× each grid LR; a bound
    where part of that grid ran, "–" where none of it did)."""
    parts = [_scaled_part(smt, scale) for scale in SCALES_TRIED]
    priced = parts[0] != "–" and any(part != "–" for part in parts[1:])
    return " → ".join(parts) if priced else "–"


def lr_markdown(records: list[dict]) -> str:
    sweeps = lr_curves(records)
    if not sweeps:
        return ""
    scaled = "SMT worst / best, lr_scale " + " → ".join(f"{scale:g}" for scale in SCALES_TRIED)
    lines = [
        "### learning rate: SMT's validation curve beside LoRA's (seed 0)", "",
        "Val NLL by LR for LoRA and SMT (`grad_sq`; `allocation` `global`, the default, and `proportional` "
        "where it was swept: one row each) on the same budget, each precision's and each LR "
        "schedule's cells compared only with each other (`cosine`: the study's; `constant`: plain AdamW, no "
        "warm-up, no decay). `SMT at LoRA's LR`: SMT's val NLL at the LR that is best for LoRA, and how far that is "
        "above SMT's own best (what keeping LoRA's LR costs). `worst on 1e-4…3e-3`: each arm's worst val NLL over "
        "that grid, where both ran all of it (mean ± std (seeds) where more seeds ran at that LR), and the worst "
        "val accuracy where the task has one (issue 24's "
        f"target: SMT's within 0.01 NLL or 1 point of LoRA's). `{scaled}`: SMT's worst "
        "(and worst accuracy) and best val NLL over the grid as it is and with each larger `smt.lr_scale`, read "
        "from SMT's cells at that multiple of each grid LR (the same runs: only the slots train; – where none "
        "ran; where only some ran, `≥` the worst of those, a bound that can rule a multiplier out). "
        "`at best LR`: each "
        "arm at its own best LR over every seed run there, mean ± std (seeds).", "",
        "| precision | schedule | task | budget | SMT allocation | SMT blocks | LoRA: val NLL by LR "
        "| SMT: val NLL by LR | best LR LoRA / SMT | SMT at LoRA's LR (− SMT's best) | worst on 1e-4…3e-3 LoRA / SMT "
        f"| {scaled} | at best LR: LoRA | at best LR: SMT |",
        "|---|---|---|---|---|---:|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for (precision, task, budget, schedule), arms in sorted(sweeps.items()):
        for arm, allocation in SMT_ARMS.items():
            if _swept(arms, arm):
                lines.append(f"| {precision} | {schedule} | {task} | {budget} | {allocation} | "
                             f"{_row(arms['lora'], arms[arm])} |")  # fmt: skip
    return "\n".join([*lines, ""])


def _row(lora_entry: dict, smt_entry: dict) -> str:
    """One SMT arm's columns beside LoRA's, from the block count on."""
    lora, smt = lora_entry["curve"], smt_entry["curve"]
    lora_best, smt_best = min(lora, key=lora.get), min(smt, key=smt.get)
    at_lora = f"{smt[lora_best]:.3f} (+{smt[lora_best] - smt[smt_best]:.3f})" if lora_best in smt else "–"
    return (f"{smt_entry['blocks'] or '–'} | {_curve(lora)} | {_curve(smt)} | {lora_best:g} / {smt_best:g} | "
            f"{at_lora} | {_worst_text(lora_entry, smt_entry)} | {_scaled_text(smt_entry)} | "
            f"{_over_seeds(lora_entry, lora_best)} | {_over_seeds(smt_entry, smt_best)}")  # fmt: skip

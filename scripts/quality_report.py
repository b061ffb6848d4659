"""The quality study's results and report: cached cells loaded per precision, each arm's LR chosen on
validation, test metrics as mean ± std over seeds, ``docs/quality.md`` with its plot and JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from quality_frontier import PLOTS, frontier_markdown, plot_frontier
from quality_lr import lr_markdown
from quality_tasks import COMMONSENSE, Harness, arm_label


def load_results(out: Path, precision: str | None = None) -> list[dict]:
    """Every cached result trained at ``precision`` (None: all; records from before the field existed are fp32)."""
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json")) if p.name != "base.json"]
    return [r for r in records if precision is None or r["cell"].get("precision", "32-true") == precision]


def best_lr(results: list[dict], task: str, arm: str, targets: str, budget: str) -> float | None:
    """The LR with the lowest validation NLL among seed-0 runs of this arm (None if none ran)."""
    runs = [r for r in results if matches_arm(r, task, arm, targets, budget) and r["cell"]["seed"] == 0]
    return min(runs, key=lambda r: r["metrics"]["val_nll"])["cell"]["lr"] if runs else None


def matches_arm(r: dict, task: str, arm: str, targets: str, budget: str) -> bool:
    c = r["cell"]
    same_budget = arm == "full" or (c["targets"] == targets and c["budget"] == budget)
    return c["task"] == task and arm_label(c) == arm and same_budget


# --- report ---------------------------------------------------------------------------------------------

METRICS = {
    "test_nll": "test NLL",
    "test_acc": "test acc",
    **{f"test_acc_{name}": f"{name} acc" for name in COMMONSENSE},  # the commonsense task's sets, each on its own
    "test_em": "GSM8K EM",
    "trained_recall": "recall (trained wording)",
    "test_recall": "recall (new wording)",
    "wiki_nll": "WikiText NLL",
}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(results: list[dict], bases: dict[str, dict]) -> list[dict]:
    """Per (task, budget, arm): the chosen LR, the LR curve (val NLL, seed 0) and test metrics over seeds."""
    rows = []
    groups = sorted(
        {(r["cell"]["task"], r["cell"]["targets"], r["cell"]["budget"], arm_label(r["cell"])) for r in results}
    )
    full_done: set[str] = set()  # full FT has no budget: one row per task, whichever targets its cells recorded
    for task, targets, budget, arm in groups:
        if arm == "full":
            if task in full_done:
                continue
            full_done.add(task)
        lr = best_lr(results, task, arm, targets, budget)
        runs = [r for r in results if matches_arm(r, task, arm, targets, budget)]
        at_lr = [r for r in runs if r["cell"]["lr"] == lr]
        curve = {r["cell"]["lr"]: r["metrics"]["val_nll"] for r in runs if r["cell"]["seed"] == 0}
        row = {
            "task": task,
            "budget": "dense" if arm == "full" else f"{targets}-{budget}",
            "arm": arm,
            "lr": lr,
            "seeds": len(at_lr),
            "trainable": at_lr[0]["trainable"],
            "lr_curve": dict(sorted(curve.items())),
        }
        for key in METRICS:
            row[key] = [r["metrics"][key] for r in at_lr if key in r["metrics"]]
        row["base"] = bases.get(task, {}).get("metrics", {})
        row["spread"] = _spread(at_lr[0].get("selection"))
        rows.append(row)
    return rows


def _spread(selection: dict | None) -> str:
    """Where a selection sits: modules used, and the share of blocks in its two most used input column blocks."""
    if not selection:
        return "–"
    counts = sorted(selection["column_blocks"].values(), reverse=True)
    top2 = sum(counts[:2]) / max(1, sum(counts))
    return f"{selection['modules_used']}/{selection['modules']} modules, {top2:.0%} in 2 column blocks"


def markdown(rows: list[dict]) -> str:
    lines = []
    for task in sorted({r["task"] for r in rows}):
        base = next(r["base"] for r in rows if r["task"] == task)
        keys = [k for k in METRICS if any(r[k] for r in rows if r["task"] == task)]
        untuned = ", ".join(f"{METRICS[k]} {base[k]:.4f}" for k in keys if k in base)
        header = " | ".join(["budget", "arm", "trainable", "LR (val)", "seeds", *(METRICS[k] for k in keys)])
        lines += [f"### {task}", "", f"untuned: {untuned}", "", f"| {header} | val NLL by LR (seed 0) | selection |",
                  "|---|---|---:|---:|---:|" + "---|" * len(keys) + "---|---|"]  # fmt: skip
        for r in (r for r in rows if r["task"] == task):
            curve = " · ".join(f"{lr:g}: {v:.3f}" for lr, v in r["lr_curve"].items())
            cells = " | ".join(_mean_std(r[k]) for k in keys)
            lines.append(f"| {r['budget']} | {r['arm']} | {r['trainable']:,} | {r['lr']:g} | {r['seeds']} | {cells} | "
                         f"{curve} | {r['spread']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task and r["test_nll"]]
        names = [f"{r['arm']}\n{r['budget']}" for r in mine]
        means = [statistics.mean(r["test_nll"]) for r in mine]
        stds = [statistics.stdev(r["test_nll"]) if len(r["test_nll"]) > 1 else 0 for r in mine]
        axes[0][col].barh(names, means, xerr=stds, color="tab:blue")
        axes[0][col].set_xlim(min(means) * 0.98, max(means) * 1.01)
        axes[0][col].set_title(f"{task}: test NLL at the validation-chosen LR (mean ± std)")
        for r in mine:
            curve = r["lr_curve"]
            axes[1][col].plot(list(curve), list(curve.values()), marker="o", label=f"{r['arm']} {r['budget']}")
        axes[1][col].set_xscale("log")
        axes[1][col].set_xlabel("learning rate")
        axes[1][col].set_ylabel("validation NLL (seed 0)")
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _facts_size(task: str) -> int | None:
    return int(task.removeprefix("facts-")) if task.startswith("facts-") else None


def capacity_curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(budget, arm) → {number of facts: its row}, for the arms measured at ≥ 3 sizes of the knowledge task."""
    curves: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        size = _facts_size(r["task"])
        if size is not None and r["test_recall"]:
            curves.setdefault((r["budget"], r["arm"]), {})[size] = r
    return {key: dict(sorted(curve.items())) for key, curve in sorted(curves.items()) if len(curve) >= 3}


def capacity_markdown(curves: dict[tuple[str, str], dict[int, dict]]) -> str:
    """The capacity curve as a table: recall in a new wording (and in the trained one) per number of facts."""
    if not curves:
        return ""
    sizes = sorted({size for curve in curves.values() for size in curve})
    lines = ["### capacity curve: facts-N, recall in a new wording (trained wording) and WikiText NLL", "",
             "| budget | arm | " + " | ".join(f"N={n}" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]  # fmt: skip
    for (budget, arm), curve in curves.items():
        cells = []
        for n in sizes:
            r = curve.get(n)
            cells.append(
                "–"
                if r is None
                else f"{statistics.mean(r['test_recall']):.3f} "
                f"({statistics.mean(r['trained_recall']):.3f}), wiki {statistics.mean(r['wiki_nll']):.2f}"
            )
        lines.append(f"| {budget} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def plot_capacity(curves: dict[tuple[str, str], dict[int, dict]], path: Path) -> None:
    """Recall in a new wording and WikiText NLL against the number of facts, one line per (budget, arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (budget, arm), curve in curves.items():
        sizes = list(curve)
        axes[0].plot(
            sizes, [statistics.mean(curve[n]["test_recall"]) for n in sizes], marker="o", label=f"{arm} {budget}"
        )
        axes[1].plot(sizes, [statistics.mean(curve[n]["wiki_nll"]) for n in sizes], marker="o", label=f"{arm} {budget}")
    for ax, label in zip(axes, ("recall in a never-trained wording", "WikiText-2 NLL (forgetting)")):
        ax.set_xscale("log")
        ax.set_xlabel("facts trained (8 epochs)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


REPORT_HEADER = """# Quality study (generated by `python scripts/quality.py report`; do not edit by hand)

SmolLM2-135M-Instruct on CPU, trained in bf16-mixed (autocast; fp32 weights and optimizer state) and evaluated
in fp32; cells trained in fp32 (`*-fp32.json`, from CPUs without native bf16) are kept out of the task tables:
they show in the learning-rate section and, where a bf16 twin exists, in the precision check. Every arm trains
100 optimizer steps of batch 8 (≤ 192 tokens) on the same batches in the same order (the data seed is the run's
seed); SMT's 5 warm-up steps are inside the 100 (gradient-free `random` needs none). Equal budget: every sparse
arm gets the trainable-weight count of LoRA of the budget's rank on the same targets (`budget` column: targets
and rank, e.g. `qkv-r8`; `trainable` column, exact); SMT blocks are 64² unless the arm says `@<side>`. AdamW, cosine
schedule to 0.1×, 3 LR warm-up steps; cells run with a constant LR (`--schedule constant`: plain AdamW, no
warm-up or decay; `*-constant.json`) are their own rows (`<arm> constant-LR`) and never enter another arm's LR
choice. Each arm's LR is the seed-0 LR with the lowest *validation* NLL; test
columns are mean ± std over the seeds run at that LR. NLL = mean next-token negative log-likelihood of the
held-out responses (alpaca: 200 records; GSM8K: 200 test problems; ARC-Easy: the correct answer's text); ARC
accuracy = choice with the highest log-probability per byte (300 test questions); GSM8K exact match only where
a cell asked for it (`run --em N`); WikiText NLL = 24 fixed windows of 256 tokens of WikiText-2 test
(forgetting: compare with the untuned line). Raw results:
`docs/quality/raw/<task>/<targets>-<budget>/<arm>/seed<S>-lr<LR>.json`.

**Knowledge tasks** (`facts-N`, generated by `smt.eval.knowledge`): N facts about fictional people (home city,
job, pet, favourite sport; values paired at random), every fact trained in three question wordings for 8
epochs (`steps` = 8 · 3N / 8, batch 8), with the prompt `Question: …\nAnswer:`; the LR grid starts at 3e-3 and
the LR is chosen by the NLL of the answers asked in a validation wording never trained on. Recall = the share of
(up to 200) facts whose true value is the most likely of the attribute's 20 values (chance 0.05), asked in the
trained wording (`recall (trained wording)`: did the fact go in?) and in a test wording never trained on
(`recall (new wording)`: can the model use it?). `spread:<criterion>` is SMT with `allocation: proportional`.
The **capacity curve** (after the task tables) follows each (budget, arm) measured at three or more sizes N, every
arm at its validation-chosen LR per size; `quality_capacity.png` plots it.

**Continued pretraining** (`code`): the Python source of the installed `lightning` package, split by module (a
hash of each file's path: 10 % test, 5 % val; held-out modules are never trained on), plain text with the loss on
every token, long files cut into consecutive 192-token windows; 200 optimizer steps of batch 8 (every linear layer
targeted: `all-*` budgets). Held-out NLL = mean next-token NLL over 50 (val) and 100 (test) evenly spaced
192-token windows of the held-out modules.

**Learn vs forget** (after the capacity curve): every arm at every LR it ran, held-out NLL against WikiText-2 NLL;
`quality_code.png` and `quality_facts-80.png` (every linear layer, r=8's budget) plot those frontiers.

"""


def precision_check(out: Path) -> str:
    """The same cells trained in fp32 and in bf16-mixed, side by side: how much the precision moves the metrics."""
    fp32 = {_same_run(r): r for r in load_results(out, "32-true")}
    pairs = [(fp32[_same_run(r)], r) for r in load_results(out, "bf16-mixed") if _same_run(r) in fp32]
    if not pairs:
        return ""
    lines = ["### precision check: the same cells trained in fp32 and in bf16-mixed", "",
             "| task | budget | arm | LR | seed | val NLL fp32 → bf16 | test NLL fp32 → bf16 "
             "| WikiText NLL fp32 → bf16 |",
             "|---|---|---|---:|---:|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        moves = [f"{a['metrics'][k]:.4f} → {b['metrics'][k]:.4f}" for k in ("val_nll", "test_nll", "wiki_nll")]
        c = a["cell"]
        lines.append(
            f"| {c['task']} | {c['targets']}-{c['budget']} | {arm_label(c)} | {c['lr']:g} | {c['seed']} | "
            + " | ".join(moves)
            + " |"
        )
    return "\n".join([*lines, ""])


def _same_run(record: dict) -> tuple:
    c = record["cell"]
    return c["task"], arm_label(c), c["lr"], c["seed"], c["targets"], c["budget"], c["steps"]


def report(harness: Harness, out_md: Path) -> str:
    results = load_results(harness.out, harness.precision)
    bases = {p.parent.name: json.loads(p.read_text()) for p in harness.out.glob("*/base.json")}
    rows = summarize(results, bases)
    curves = capacity_curves(rows)
    sections = [markdown(rows), capacity_markdown(curves), frontier_markdown(results),
                lr_markdown(load_results(harness.out)), precision_check(harness.out)]  # fmt: skip
    text = "\n".join(sections)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(REPORT_HEADER + text)
    if rows:
        plot(rows, out_md.with_suffix(".png"))
    if curves:
        plot_capacity(curves, out_md.with_name(out_md.stem + "_capacity.png"))
    for task in PLOTS:
        base = bases.get(task, {}).get("metrics", {})
        plot_frontier(results, task, base, out_md.with_name(f"{out_md.stem}_{task}.png"))
    (out_md.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    return text

"""The quality report's learn-vs-forget section: every LR an arm ran, not only the one validation chose.

A claim that one method forgets less than another is only as good as the LRs compared: a lower LR learns less and
forgets less, so an arm at a larger LR than its rival's can "lose" on forgetting by choice of LR alone. For each
(task, budget) where arms ran at several LRs, this lists each arm's points (seed means) on both axes — held-out
NLL (learning) and WikiText-2 NLL (forgetting) — and names, for each point, any other arm's point that is better
on both: what a reader needs to say "A forgets less than B at equal learning" from the frontier, not from one LR.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from quality_lr import mean_std
from quality_tasks import arm_label

PLOTS = {"code": "all-r8", "facts-80": "all-r8"}
"""The (task, budget) frontiers drawn as ``quality_<task>.png``: the learn-vs-forget claims the README makes."""
SECOND = (("test_recall", "recall (new wording)"), ("test_acc", "test acc"))
"""A task's own second learning metric, shown beside test NLL where its cells measured one."""


def frontiers(records: list[dict]) -> dict[tuple[str, str], dict[str, dict[float, list[dict]]]]:
    """``(task, budget) → arm → {lr: [metrics of each seed]}`` for cells that measured WikiText-2; full FT (no
    budget) joins every budget of its task as the ceiling. Kept: groups where two or more arms ran and at least
    one of them at two or more LRs (a single point per arm is the task table, not a frontier)."""
    groups: dict[tuple[str, str], dict[str, dict[float, list[dict]]]] = {}
    dense: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        c, m = r["cell"], r["metrics"]
        other_regime = c.get("warmup_on_top") or c.get("schedule", "cosine") != "cosine"  # the LR section's question
        if other_regime or "wiki_nll" not in m or "test_nll" not in m:
            continue
        arm = arm_label(c)
        if arm == "full":
            by_lr = dense.setdefault(c["task"], {})
        else:
            by_lr = groups.setdefault((c["task"], f"{c['targets']}-{c['budget']}"), {}).setdefault(arm, {})
        by_lr.setdefault(c["lr"], []).append(m)
    kept = {}
    for (task, budget), arms in sorted(groups.items()):
        if len(arms) >= 2 and any(len(lrs) >= 2 for lrs in arms.values()):
            kept[(task, budget)] = {**arms, **({"full": dense[task]} if task in dense else {})}
    return kept


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(m[key] for m in runs)


def _value(runs: list[dict], key: str) -> str:
    values = [m[key] for m in runs if key in m]
    return mean_std(values) if values else "–"


def beaten_by(arms: dict[str, dict[float, list[dict]]], arm: str, lr: float) -> list[str]:
    """The other arms with a point whose seed means are lower on both held-out NLL and WikiText-2 NLL than
    (arm, lr)'s, each with the LRs where it is."""
    runs = arms[arm][lr]
    test, wiki = _mean(runs, "test_nll"), _mean(runs, "wiki_nll")
    beaten = []
    for other, lrs in sorted(arms.items()):
        better = [olr for olr, o in sorted(lrs.items()) if _mean(o, "test_nll") < test and _mean(o, "wiki_nll") < wiki]
        if other != arm and better:
            beaten.append(f"{other} ({', '.join(f'{olr:g}' for olr in better)})")
    return beaten


def frontier_markdown(records: list[dict]) -> str:
    groups = frontiers(records)
    if not groups:
        return ""
    lines = [
        "### learn vs forget: every LR each arm ran", "",
        "Per (task, budget), every arm at every LR it ran (mean ± std over the seeds run there; full FT is the "
        "dense ceiling): held-out NLL (learning, lower is better), the task's own second metric where it has one, "
        "and WikiText-2 NLL (forgetting, lower is better). `beaten by`: the other arms with a point lower on both "
        "NLLs (seed means), and at which LRs; only cells under the study's cosine schedule. A point nobody beats "
        "is on the frontier; read forgetting claims from here, not from the validation-chosen LR alone (a "
        "smaller LR learns less and forgets less).", "",
    ]  # fmt: skip
    for (task, budget), arms in groups.items():
        second = [(k, name) for k, name in SECOND if any(k in m for lrs in arms.values() for r in lrs.values()
                                                        for m in r)]  # fmt: skip
        header = ["arm", "LR", "seeds", "test NLL", *(name for _, name in second), "WikiText NLL", "beaten by"]
        lines += [f"#### {task}, {budget}", "", "| " + " | ".join(header) + " |",
                  "|---|---:|---:|" + "---|" * (len(header) - 3)]  # fmt: skip
        for arm, lrs in sorted(arms.items()):
            for lr, runs in sorted(lrs.items()):
                cells = [_value(runs, "test_nll"), *(_value(runs, k) for k, _ in second), _value(runs, "wiki_nll")]
                beaten = ", ".join(beaten_by(arms, arm, lr)) or "–"
                lines.append(f"| {arm} | {lr:g} | {len(runs)} | " + " | ".join(cells) + f" | {beaten} |")
        lines.append("")
    return "\n".join(lines)


def plot_frontier(records: list[dict], task: str, base: dict, path: Path) -> bool:
    """``task``'s learn-vs-forget frontier at its ``PLOTS`` budget: each arm a path through its LRs (seed means,
    std bars, LR labels), the untuned model a star. False (nothing written) where there is no such frontier."""
    arms = frontiers(records).get((task, PLOTS[task]))
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for arm, lrs in sorted(arms.items()):
        points = sorted(lrs.items())
        xs = [_mean(runs, "wiki_nll") for _, runs in points]
        ys = [_mean(runs, "test_nll") for _, runs in points]
        xerr = [statistics.stdev(m["wiki_nll"] for m in runs) if len(runs) > 1 else 0 for _, runs in points]
        yerr = [statistics.stdev(m["test_nll"] for m in runs) if len(runs) > 1 else 0 for _, runs in points]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=arm)
        for (lr, _), x, y in zip(points, xs, ys):
            ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if "wiki_nll" in base and "test_nll" in base:
        ax.plot(base["wiki_nll"], base["test_nll"], marker="*", markersize=12, color="black", label="untuned")
    ax.set_xlabel("WikiText-2 NLL (forgetting: right is worse)")
    ax.set_ylabel(f"{task}: held-out NLL (learning: down is better)")
    ax.set_yscale("log")
    ax.set_title(f"{task}, {PLOTS[task]}: learn vs forget, every LR run (labels: LR)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

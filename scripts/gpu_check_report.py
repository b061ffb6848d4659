"""The tables of ``scripts/gpu_check.py``: kept in memory, written whole after every row, judged against targets.

``results.json`` holds the header (mode, command, machine, versions), every phase's status, every table as a
list of rows and the targets; ``summary.md`` shows the same as markdown. Both are rewritten (to a temporary name,
then renamed) each time a row or a phase finishes, so a run stopped at any point leaves what it had measured.

Targets (issue 26; the scores target is docs/kernels.md's):

- block dW ≥ 90 % of the dense GEMM's TFLOP/s on the same tiles, per block size (worst row counts);
- fused block scores ≤ 1.1× one dense ``dyᵀx``, per block size (worst row counts);
- per SMT arm and batch shape: step ≤ 0.85× LoRA's, step ≤ 0.40× full FT's, peak memory ≤ 0.9× LoRA's.

A margin is how far inside the threshold the value is (negative: missed by that much), in the ratio's units.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

TARGETS_HEAD = ["target", "where", "value", "threshold", "margin", "status"]


class Report:
    """Results of one run, written to ``out`` after every change."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.data = {**header, "phases": [], "tables": {}, "targets": []}
        self.write()

    def record(self, table: str, row: dict) -> None:
        self.data["tables"].setdefault(table, []).append(row)
        self.write()

    def phase(self, entry: dict) -> None:
        self.data["phases"].append(entry)
        self.write()

    def write(self) -> None:
        self.data["targets"] = judge(self.data["tables"], self.data["mode"] == "dry-run")
        _write_atomic(self.out / "results.json", json.dumps(self.data, indent=1, default=str))
        _write_atomic(self.out / "summary.md", self.markdown())

    def markdown(self) -> str:
        data = self.data
        lines = [f"# GPU check ({data['mode']})", ""]
        if data["mode"] == "dry-run":
            lines += ["**Dry run on CPU: tiny shapes, Triton in its interpreter, wall-clock times. The numbers mean "
                      "nothing; the run only shows that every code path works.**", ""]  # fmt: skip
        versions = ", ".join(f"{name} {version}" for name, version in data["versions"].items())
        machine = ", ".join(f"{key} {_cell(value)}" for key, value in data["machine"].items())
        lines += [f"- machine: {machine}", f"- versions: {versions}",
                  f"- command: `{data['command']}` (in {data['cwd']})", "", "## Targets", "", self.targets_markdown(),
                  "", "## Phases", "", self.phases_markdown()]  # fmt: skip
        for name, rows in data["tables"].items():
            lines += ["", f"## {name}", "", table_markdown(rows)]
        return "\n".join(lines) + "\n"

    def targets_markdown(self) -> str:
        return table_markdown(self.data["targets"], TARGETS_HEAD) if self.data["targets"] else "(no target measured)"

    def phases_markdown(self) -> str:
        if not self.data["phases"]:
            return "(no phase finished)"
        return table_markdown(self.data["phases"], ["phase", "status", "seconds", "budget_s", "note"])


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as a markdown table; columns in order of first appearance unless given."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- targets ----------------------------------------------------------------------------------------------


def target(name: str, where: str, value: float | None, threshold: float, at_least: bool, dry_run: bool) -> dict:
    """One target row; ``margin`` > 0 means met by that much, < 0 missed by that much."""
    if value is None:
        return {"target": name, "where": where, "value": None, "threshold": threshold, "margin": None,
                "status": "not measured"}  # fmt: skip
    margin = value - threshold if at_least else threshold - value
    status = "pass" if margin >= 0 else "miss"
    return {"target": name, "where": where, "value": value, "threshold": threshold, "margin": margin,
            "status": f"{status} (dry run)" if dry_run else status}  # fmt: skip


def _worst(rows: list[dict], key: str, at_least: bool) -> dict:
    return (min if at_least else max)(rows, key=lambda row: row[key])


def kernel_targets(tables: dict, dry_run: bool) -> list[dict]:
    found = []
    checks = (("block_dw", "of_tiles_bmm", 0.90, True, "block dW TFLOP/s ÷ dense GEMM's on the same tiles"),
              ("block_scores", "of_dense_dw", 1.10, False, "fused scores time ÷ one dense dW"))  # fmt: skip
    for table, key, threshold, at_least, name in checks:
        rows = tables.get(table, [])
        for block in sorted({row["block"] for row in rows}):
            of_block = [row for row in rows if row["block"] == block]
            worst = _worst(of_block, key, at_least)
            met = sum((row[key] >= threshold) if at_least else (row[key] <= threshold) for row in of_block)
            density = f", density {worst['density']:.1%}, k={worst['k']}" if "density" in worst else ""
            where = f"{block}² blocks; worst: {worst['weight']}{density}; {met}/{len(of_block)} rows meet it"
            found.append(target(name, where, worst[key], threshold, at_least, dry_run))
    return found


def train_targets(tables: dict, dry_run: bool) -> list[dict]:
    found = []
    checks = (("step_of_lora", 0.85, "SMT step time ÷ LoRA's"), ("step_of_full", 0.40, "SMT step time ÷ full FT's"),
              ("peak_of_lora", 0.90, "SMT peak memory ÷ LoRA's"))  # fmt: skip
    for row in tables.get("train", []):
        if row["method"] != "smt" or row["status"] != "ok":
            continue
        where = f"{row['arm']}, seq {row['seq']} × batch {row['batch']}"
        for key, threshold, name in checks:
            found.append(target(name, where, row.get(key), threshold, False, dry_run))
    return found


def judge(tables: dict, dry_run: bool) -> list[dict]:
    """Every target the tables so far can answer."""
    return kernel_targets(tables, dry_run) + train_targets(tables, dry_run)

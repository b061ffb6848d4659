"""Static selection vs dynamic regrowth (ag, ma) on one model, data and seed; prints a table, writes a PNG.

    python scripts/compare_regrowth.py                       # boolq slice from ../shared/data, tiny random Llama
    python scripts/compare_regrowth.py --steps 60 --out runs/regrowth

All variants run in this process, one after another, with the same seed, data order and budget. The
table reports final train/val loss, median step time, and the regrowth cost: scoring-window step time
relative to the other tuning steps of the same run (the scoring windows add block scoring to A of every R steps),
measured side by side so machine noise cancels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from smt.core.config import RegrowthConfig
from smt.lightning.callback import SparseMatrixTuning
from smt.lightning.datamodule import InstructionDataModule
from smt.lightning.module import SMTLanguageModel

TINY = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384)  # fmt: skip


class StepRecorder(Callback):
    """Train loss and wall time of every optimizer step."""

    def __init__(self, smt: SparseMatrixTuning) -> None:
        self.smt = smt
        self.losses: list[float] = []
        self.times: list[float] = []
        self.scoring: list[bool] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        regrower = self.smt.regrower  # the SMT callback runs first and has opened a window if one is due
        self.scoring.append(self.smt.phase == "tuning" and regrower is not None and bool(regrower.scorers))
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))

    def window_cost(self, warmup: int, every: int, accumulate: int) -> tuple[float, float]:
        """Median step time in scoring windows ÷ other tuning steps, and the overhead it implies at A of R steps."""
        window = [t for t, s in zip(self.times[warmup:], self.scoring[warmup:]) if s]
        plain = [t for t, s in zip(self.times[warmup:], self.scoring[warmup:]) if not s]
        if not window or not plain:
            return float("nan"), float("nan")
        ratio = statistics.median(window) / statistics.median(plain)
        return ratio, (ratio - 1) * accumulate / every


def toy_file(folder: Path) -> Path:
    """A small real-looking boolq-style file, for machines without ../shared/data."""
    rows = [{"instruction": f"Is {a} greater than {b}? Answer true or false.", "input": "",
             "output": f"the correct answer is {str(a > b).lower()}", "answer": str(a > b).lower()}
            for a in range(20) for b in range(20)]  # fmt: skip
    path = folder / "toy_train.json"
    path.write_text(json.dumps(rows))
    return path


def run(variant: str, regrowth: RegrowthConfig | None, args, train_path: Path) -> dict:
    seed_everything(args.seed, verbose=False)
    model = SMTLanguageModel(model_config=TINY, tokenizer="bytes", lr=args.lr, scheduler="constant")
    data = InstructionDataModule(train_path=str(train_path), val_split=64, batch_size=8, max_length=160,
                                 limit_train=args.steps * 8, seed=args.seed)  # fmt: skip
    data.set_tokenizer(model.tokenizer)
    smt = SparseMatrixTuning(target_modules=["q_proj", "k_proj", "v_proj"], block_size=16, density=0.05,
                             warmup_steps=args.warmup, regrowth=regrowth)  # fmt: skip
    recorder = StepRecorder(smt)
    trainer = Trainer(max_steps=args.steps, accelerator="cpu", callbacks=[smt, recorder], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      val_check_interval=args.steps, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, data)
    total = sum(recorder.times)  # the training steps only: imports, data and caching are not the method's cost
    tuning_times = recorder.times[args.warmup :]
    swapped = sum(h["swapped"] for h in smt.regrower.history) if smt.regrower else 0
    ratio, overhead = recorder.window_cost(args.warmup, *(regrowth.every, regrowth.accumulate) if regrowth else (1, 1))
    return {
        "window_ratio": ratio, "overhead": overhead,
        "variant": variant, "losses": recorder.losses, "total_s": total,
        "median_step_s": statistics.median(tuning_times), "val_loss": float(trainer.callback_metrics["val/loss"]),
        "final_train": statistics.mean(recorder.losses[-10:]), "swapped": swapped,
    }  # fmt: skip


def table(results: list[dict]) -> str:
    header = ("| variant | train loss (last 10) | val loss | blocks swapped | median step s | scoring-window step ÷ "
              "other step (same run) | regrowth overhead at A/R |")  # fmt: skip
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['final_train']:.4f} | {r['val_loss']:.4f} | {r['swapped']} | "
                     f"{r['median_step_s']:.3f} | {r['window_ratio']:.2f} | {100 * r['overhead']:.1f} % |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r["losses"], label=r["variant"], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title("SMT: static selection vs regrowth (tiny Llama, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/llm_adapters/boolq/train.json", help="training file")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per variant (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=10, help="SMT warm-up steps")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/regrowth", help="folder for the PNG and JSON")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path = Path(args.data) if Path(args.data).is_file() else toy_file(out)
    print(f"data: {train_path}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    variants = [("static", None),
                ("regrow ag", RegrowthConfig(every=20, accumulate=5, rate=0.2, criterion="ag")),
                ("regrow ma", RegrowthConfig(every=20, accumulate=5, rate=0.2, criterion="ma"))]  # fmt: skip
    results = [run(name, config, args, train_path) for name, config in variants]
    print(table(results))
    plot(results, out / "regrowth_loss.png")
    (out / "regrowth.json").write_text(json.dumps(results, indent=1))
    print(f"plot: {out / 'regrowth_loss.png'}")


if __name__ == "__main__":
    main()

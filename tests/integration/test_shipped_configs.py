"""Every shipped YAML parses with the CLI's own parser, and the real-use configs hold what their comments say.

``smt fit --config F --print_config`` parses and type-checks ``F`` with ``SMTCLI``'s parser and prints the
result without instantiating anything, so configs naming 8B models that are not here still parse. The
callback and data module are then built from the printed sections (cheap, no model). The real-use
budgets are checked on the real architectures, built on the ``meta`` device (shapes only, no memory).
"""

import json

import pytest
import torch
import yaml
from conftest import DEBUG_CONFIG, REPO, write_arithmetic_records

from smt import SMTConfig, SparseMatrixTuning, inject, trainable_summary
from smt.adapters.delta import read_delta
from smt.lightning.cli import main
from smt.lightning.datamodule import InstructionDataModule
from smt.lightning.export import load_checkpoint

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SMT_BUDGET = 0.0084  # SMT: blocks = 0.84 % of all 2-D weight elements of the model / 256²
ARCHITECTURES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000},
}  # fmt: skip
REAL_USE = {
    "llama3-8b-commonsense.yaml": "llama3-8b",
    "llama3-8b-commonsense-v-only.yaml": "llama3-8b",
    "llama3-8b-math10k.yaml": "llama3-8b",
    "llama2-7b-commonsense.yaml": "llama2-7b",
}


def printed_config(path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def assert_given_values_kept(written, printed, where: str = "") -> None:
    """Every value written in the file comes out of the parser unchanged (defaults may be added around it)."""
    if isinstance(written, dict):
        assert isinstance(printed, dict), where
        for key, value in written.items():
            assert key in printed, f"{where}{key} was dropped by the parser"
            assert_given_values_kept(value, printed[key], f"{where}{key}.")
    elif isinstance(written, list) and written and isinstance(written[0], dict):
        assert len(written) == len(printed), where
        for index, (item, parsed) in enumerate(zip(written, printed)):
            assert_given_values_kept(item, parsed, f"{where}{index}.")
    else:
        assert written == printed, f"{where}: {written!r} in the file, {printed!r} after parsing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_opens_with_its_launch_command(path, capsys):
    header = "".join(line for line in path.read_text().splitlines(keepends=True)[:8] if line.startswith("#"))
    assert f"--config configs/{path.name}" in header, "the header must show the command that runs this file"
    printed = printed_config(path, capsys)
    assert_given_values_kept(yaml.safe_load(path.read_text()), printed)
    SparseMatrixTuning(**printed["smt"])  # budget, criterion, block size and the rest validate without a model
    InstructionDataModule(**printed["data"])


def test_every_real_use_config_is_checked_here():
    own_tests = {"debug.yaml", "debug-nf4.yaml", "quickstart.yaml", "smollm2-new-facts.yaml",
                 "smollm2-commonsense.yaml"}  # fmt: skip
    shipped = {p.name for p in CONFIGS} - own_tests
    assert shipped == set(REAL_USE)


def meta_llama(architecture: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=32, **ARCHITECTURES[architecture])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", REAL_USE)
def test_real_use_budget_is_smts_on_the_real_architecture(name, capsys):
    smt = printed_config(REPO / "configs" / name, capsys)["smt"]
    model = meta_llama(REAL_USE[name])
    two_d_weights = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    assert smt["num_blocks"] == int(SMT_BUDGET * two_d_weights / 256**2)
    assert smt["block_size"] == 256 and smt["warmup_steps"] == 100
    fields = {k: smt[k] for k in ("target_modules", "block_size", "num_blocks", "warmup_steps", "criterion")}
    bank = inject(model, SMTConfig(**fields))  # the budget fits the targeted modules of this architecture
    assert bank.capacity == smt["num_blocks"]
    assert trainable_summary(model).percent == pytest.approx(100 * SMT_BUDGET, abs=0.005)


def test_real_use_numerics_run_on_the_debug_model(tmp_path):
    """bf16 base weights, bf16-mixed, fp32 slots, checkpointing, clipping and SMT's criterion, on a tiny model."""
    real = yaml.safe_load((REPO / "configs" / "llama3-8b-commonsense.yaml").read_text())
    overrides = [
        f"--trainer.precision={real['trainer']['precision']}",
        f"--trainer.gradient_clip_val={real['trainer']['gradient_clip_val']}",
        f"--model.dtype={real['model']['dtype']}",
        f"--model.gradient_checkpointing={str(real['model']['gradient_checkpointing']).lower()}",
        f"--model.scheduler={real['model']['scheduler']}",
        f"--smt.criterion={real['smt']['criterion']}",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=0",
    ]
    train = write_arithmetic_records(tmp_path / "train.json")
    assert main(["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train), *overrides]) == 0
    (checkpoint_path,) = tmp_path.rglob("*.ckpt")
    state = load_checkpoint(checkpoint_path)["state_dict"]
    assert state["model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # base in bf16
    slots = [v for k, v in state.items() if k.startswith("model.smt_bank.slots.")]
    assert slots and all(s.dtype == torch.float32 for s in slots) and any(s.any() for s in slots)  # fp32 Δ, trained
    assert (tmp_path / "runs" / "debug" / "delta.safetensors").is_file()


TINY_MODEL = [  # the shape of configs/debug.yaml's model, for configs that name an 8B model or a converted folder
    "--model.model=null", '--model.model_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, '
    '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384}',
    "--model.tokenizer=bytes", "--model.dtype=float32", "--trainer.accelerator=cpu", "--trainer.devices=1",
    "--trainer.precision=32-true", "--trainer.val_check_interval=1.0", "--smt.block_size=16", "--smt.num_blocks=4",
    "--smt.budget_lora_rank=null",
    "--data.train_path=configs/data/debug.jsonl", "--data.val_path=null", "--data.val_split=8", "--data.test_paths=[]",
    "--data.test_tasks=null", "--data.num_workers=0", "--data.batch_size=4",
]  # fmt: skip
RUNS_AS_SHIPPED = {"debug.yaml", "debug-nf4.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_runs_two_steps(path, tmp_path):
    """``smt fit --config F`` from the repository root, cut to 2 steps (1 of warm-up); configs that name a big model
    (or one a script converts) get the debug model and data instead."""
    if path.name == "debug-nf4.yaml":
        pytest.importorskip("bitsandbytes")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the configs' relative paths, outputs under tmp_path
    overrides = [] if path.name in RUNS_AS_SHIPPED else TINY_MODEL
    args = ["fit", "--config", f"configs/{path.name}", *overrides, "--trainer.max_steps=2", "--smt.warmup_steps=1"]
    assert main(args) == 0
    assert any((tmp_path / "runs").rglob("delta.safetensors"))


def test_new_facts_config_trains_every_linear_layer_on_written_facts(tmp_path):
    """configs/smollm2-new-facts.yaml as its header runs it (facts written by scripts/write_facts.py's function), on
    the debug model: random blocks drawn before the first step, spread over the linear layers, the held-out wording
    validated."""
    from smt.eval.knowledge import write_facts

    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_facts(8, tmp_path / "runs" / "new-facts" / "data")
    model = [a for a in TINY_MODEL if not a.startswith(("--data.", "--smt.num_blocks", "--trainer.val_check"))]
    args = ["fit", "--config", "configs/smollm2-new-facts.yaml", *model, "--smt.num_blocks=28",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3"]  # fmt: skip
    assert main(args) == 0
    selection, _, _ = read_delta(tmp_path / "runs" / "new-facts" / "delta.safetensors")
    assert selection.criterion == "random" and selection.warmup_steps == 0  # drawn before the first step
    per_module = {name: len(index) for name, index in selection.blocks.items() if len(index)}
    assert sum(per_module.values()) == 28 and len(per_module) >= 7  # of 2 layers × 7 linear layers: spread
    metrics = (next((tmp_path / "runs" / "new-facts").rglob("metrics.csv"))).read_text()
    assert "val" in metrics.splitlines()[0]


COMMONSENSE_SETS = {"boolq": ["true", "false"], "ARC-Easy": [f"answer{i}" for i in range(1, 5)],
                    "ARC-Challenge": [f"answer{i}" for i in range(1, 5)],
                    "openbookqa": [f"answer{i}" for i in range(1, 5)]}  # fmt: skip


def write_llm_adapters_set(folder, name: str, labels: list[str], count: int) -> None:
    """A tiny LLM-Adapters-format set (question with its label choices → "the correct answer is <label>")."""
    for split, rows in (("train", count), ("test", 3)):
        records = [{"instruction": f"{name} question {i}? Answer format: {'/'.join(labels)}", "input": "",
                    "output": f"the correct answer is {labels[i % len(labels)]}", "answer": labels[i % len(labels)]}
                   for i in range(rows)]  # fmt: skip
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{split}.json").write_text(json.dumps(records))


def test_commonsense_config_trains_the_four_sets_as_one_and_tests_each(tmp_path, monkeypatch):
    """configs/smollm2-commonsense.yaml with its data paths as shipped (tiny sets where ../shared/data would be), on
    the debug model: the four train splits train as one mix with validation carved from it, and ``smt test`` scores
    each test set by label likelihood."""
    repo, data = tmp_path / "repo", tmp_path / "shared" / "data" / "llm_adapters"
    repo.mkdir()
    (repo / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(repo)  # the config's ../shared/data is this test's own folder
    for index, (name, labels) in enumerate(COMMONSENSE_SETS.items()):
        write_llm_adapters_set(data, name, labels, count=6 + index)
    model = [a for a in TINY_MODEL if not a.startswith(("--data.", "--smt.num_blocks", "--trainer.val_check"))]
    shared = [*model, "--smt.budget_lora_rank=2", "--data.val_split=4"]
    fit = ["fit", "--config", "configs/smollm2-commonsense.yaml", *shared, "--trainer.max_steps=3",
           "--trainer.val_check_interval=3", "--smt.warmup_steps=1"]  # fmt: skip
    assert main(fit) == 0
    runs = repo / "runs" / "smollm2-commonsense"
    selection, _, _ = read_delta(runs / "delta.safetensors")
    assert sum(len(index) for index in selection.blocks.values()) == 5  # LoRA r=2 on q,k,v of 2 layers: 1,280 / 16²
    last = runs / "checkpoints" / "last.ckpt"
    test = ["test", "--config", "configs/smollm2-commonsense.yaml", *shared, f"--ckpt_path={last}"]
    assert main(test) == 0
    results = json.loads((runs / "test_results.json").read_text())
    assert {name: scores["total"] for name, scores in results["tasks"].items()} == dict.fromkeys(COMMONSENSE_SETS, 3)
    metrics = next(runs.rglob("metrics.csv")).read_text()
    assert "val" in metrics.splitlines()[0]  # validation carved from the mix ran

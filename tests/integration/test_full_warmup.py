"""``smt.warmup_updates=full`` end to end on ``configs/debug.yaml`` (8 steps, warm-up 3, a checkpoint every step).

What trains when (dense weights move in steps 1–3 and never after; their optimizer state is gone after step 3),
the merged model equals the trained one (``smt export --merged``, ``smt merge`` onto the warmed base, ``DeltaSet``
on it), and every operation that cannot carry the warm-up's dense change refuses in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEBUG_CONFIG

from smt.adapters.deltaset import DeltaSet
from smt.lightning.checkpoint_io import read_checkpoint
from smt.lightning.cli import main
from smt.lightning.export import model_from_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FULL = ["--smt.warmup_updates=full", "--smt.warmup_lr=0.003", "--model.slim_checkpoints=false"]
EVERY_STEP = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
]
DENSE = "model.model.layers.0.mlp.up_proj.weight"  # not a target: only the warm-up moves it
TARGET = "model.model.layers.0.self_attn.q_proj.weight"  # a target: W_warm, then Δ in the slots


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_file) -> Path:
    folder = tmp_path_factory.mktemp("full_warmup")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        args = ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), *FULL, *EVERY_STEP]
        assert main(args) == 0
    return folder / "runs" / "debug"


def state(run: Path, step: int) -> dict:
    return read_checkpoint(run / "checkpoints" / f"step={step}.ckpt")


def test_dense_weights_train_in_the_warmup_only_and_their_state_is_freed(run):
    s = {step: state(run, step) for step in (1, 2, 3, 4, 8)}
    weights = {step: s[step]["state_dict"] for step in s}
    assert not torch.equal(weights[1][DENSE], weights[2][DENSE])
    assert not torch.equal(weights[2][DENSE], weights[3][DENSE])
    for name in (DENSE, TARGET):  # frozen from the selection on: the blocks tune on W_warm
        assert torch.equal(weights[3][name], weights[8][name]), name
    groups = s[2]["optimizer_states"][0]["param_groups"]
    assert [g.get("smt_full_warmup", False) for g in groups] == [False, True] and groups[1]["lr"] == 0.003
    slots = len(groups[0]["params"])
    assert len(s[2]["optimizer_states"][0]["state"]) > slots  # the warm-up holds full FT's state
    assert len(s[4]["optimizer_states"][0]["state"]) == slots  # … freed at selection


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_merged_model_and_warm_base_plus_delta_equal_the_trained_model(run, tmp_path):
    checkpoint = run / "checkpoints" / "step=8.ckpt"
    trained = model_from_checkpoint(checkpoint).model.eval()
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(trained, ids)
    delta = tmp_path / "delta.safetensors"
    assert main(["export", str(checkpoint), "--merged", str(tmp_path / "merged"), "--delta", str(delta), "--dtype",
                 "float32"]) == 0  # fmt: skip
    merged = load(tmp_path / "merged")
    assert torch.equal(logits(merged, ids), expected)
    warm = tmp_path / "delta.warm_base"
    assert main(["merge", str(warm), str(delta), str(tmp_path / "rebuilt")]) == 0
    rebuilt = load(tmp_path / "rebuilt")
    assert torch.equal(logits(rebuilt, ids), expected)
    swapped = load(warm)
    DeltaSet(swapped).add("tuned", delta)
    assert (run / "delta.warm_base" / "config.json").is_file()  # fit's own delta_path got its warmed base too


def test_what_cannot_carry_the_dense_change_refuses_in_one_line(run, tmp_path):
    from smt.adapters.lora import export_lora
    from smt.adapters.shira import export_shira_from_file

    delta = run / "delta.safetensors"
    module = model_from_checkpoint(run / "checkpoints" / "step=8.ckpt")
    fresh = model_from_checkpoint(run / "checkpoints" / "step=8.ckpt").model
    from smt.core.merge import remove_smt

    remove_smt(fresh)  # a plain model without the warm tag stands for the original base
    refusals = [
        lambda: export_shira_from_file(delta, tmp_path / "shira"),
        lambda: export_lora(module.model, tmp_path / "lora", 2),
        lambda: DeltaSet(fresh).add("tuned", delta),
    ]
    for refuse in refusals:
        with pytest.raises(ValueError, match="warm") as caught:
            refuse()
        assert "\n" not in str(caught.value)

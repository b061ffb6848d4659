"""Adapter round trips through the ``smt`` command: fit → export (delta, merged, SHiRA, LoRA) → merge → plain models.

One real ``smt fit --config configs/debug.yaml`` runs in-process; every test reads what it wrote. The SMT
model's forward (base + bank) is the reference each exported form must reproduce.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG_CONFIG

from smt.adapters.lora import base_copy
from smt.lightning.cli import main
from smt.lightning.export import model_from_checkpoint

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, train_file):
    """``smt fit`` (debug config), its base saved as a folder, ``smt export`` of the delta, merged model and LoRA."""
    root = tmp_path_factory.mktemp("roundtrip")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        fit = ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), "--trainer.max_steps=6"]
        assert main([*fit, "--trainer.limit_val_batches=0"]) == 0
        (checkpoint,) = root.rglob("*.ckpt")
        module = model_from_checkpoint(checkpoint)
        base_copy(module.model).save_pretrained(root / "base")  # the random debug base, as a plain folder
        module.tokenizer.save_pretrained(root / "base")
        args = [
            "--delta",
            "delta.safetensors",
            "--dtype",
            "fp32",
            "--merged",
            "merged",
            "--lora",
            "64",
            "--lora_out",
            "lora",
            "--peft",
            "shira",
        ]
        assert main(["export", str(checkpoint), *args]) == 0
    tuned = module.model.eval()
    with torch.no_grad():
        reference = tuned(input_ids=IDS).logits
    return SimpleNamespace(root=root, checkpoint=checkpoint, tuned=tuned, reference=reference)


def load_plain(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    assert not any("smt" in key for key in model.state_dict())
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merge_of_the_exported_delta_equals_the_smt_forward_in_plain_transformers(exported):
    out = exported.root / "merged_by_cli"
    assert main(["merge", str(exported.root / "base"), str(exported.root / "delta.safetensors"), str(out)]) == 0
    merged = load_plain(out)
    torch.testing.assert_close(logits(merged), exported.reference, rtol=0, atol=1e-5)
    exported_merged = load_plain(exported.root / "merged").state_dict()  # smt export --merged: the same bits
    assert all(torch.equal(value, exported_merged[key]) for key, value in merged.state_dict().items())


def test_fusion_of_two_halves_is_the_whole_delta(exported):
    delta = str(exported.root / "delta.safetensors")
    out = exported.root / "fused"
    assert main(["merge", str(exported.root / "base"), delta, delta, "--weights", "0.5", "0.5", "--out", str(out)]) == 0
    fused, merged = load_plain(out).state_dict(), load_plain(exported.root / "merged").state_dict()
    assert all(torch.equal(value, merged[key]) for key, value in fused.items())  # 0.5Δ + 0.5Δ = Δ, one rounding


def test_lora_export_loads_in_peft_and_matches_the_exact_delta_at_full_rank(exported, capsys):
    from peft import PeftModel

    report = json.loads((exported.root / "lora" / "smt_lora_report.json").read_text())
    assert report["rank"] == 64 and max(report["modules"].values()) < 1e-6 and report["output_error"] < 1e-5
    peft_model = PeftModel.from_pretrained(load_plain(exported.root / "base"), str(exported.root / "lora")).eval()
    torch.testing.assert_close(logits(peft_model), exported.reference, rtol=0, atol=1e-5)


def test_peft_export_loads_in_peft_and_reproduces_the_tuned_logits(exported):
    from peft import PeftModel

    config = json.loads((exported.root / "shira" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA"
    peft_model = PeftModel.from_pretrained(load_plain(exported.root / "base"), str(exported.root / "shira")).eval()
    torch.testing.assert_close(logits(peft_model), exported.reference, rtol=0, atol=1e-5)


# --- bad input through smt merge: one line, exit 2, base folder and output untouched ----------------------


def rewrite(source: Path, target: Path, how: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if how == "truncated":
        target.write_bytes(source.read_bytes()[:-64])
        return target
    tensors = load_file(source)
    with safe_open(str(source), "pt") as handle:
        meta = handle.metadata()
    if how == "another base (shape)":
        grids = json.loads(meta["grids"])
        for dims in grids.values():
            dims[0] *= 2  # the same modules, twice as many rows
        meta["grids"] = json.dumps(grids)
    elif how == "another base (id)":
        meta["base_model_id"] = "org/another-model"
    elif how == "future version":
        meta["format_version"] = "7"
    elif how == "nan":
        key = next(k for k in tensors if k.endswith("smt_delta"))
        tensors[key][0, 1, 2] = float("nan")
    save_file(tensors, target, metadata=meta)
    return target


BAD = {
    "another base (shape)": "does not fit this model",
    "another base (id)": "made for base 'org/another-model'",
    "future version": "newer than this smt",
    "nan": "non-finite",
    "truncated": "truncated",
}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", BAD)
def test_merge_refuses_a_bad_delta_in_one_line_and_writes_nothing(exported, case, tmp_path, capsys):
    good = exported.root / "delta.safetensors"
    bad = rewrite(good, tmp_path / "bad.safetensors", case)
    base = exported.root / "base"
    before = digest(base)
    code = main(["merge", str(base), str(good), str(bad), str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smt: error:")]
    assert code == 2 and len(errors) == 1 and BAD[case] in errors[0], errors
    assert digest(base) == before and not (tmp_path / "out").exists()


def test_merge_output_must_be_a_new_folder(exported, capsys):
    base, delta = str(exported.root / "base"), str(exported.root / "delta.safetensors")
    for args, message in [
        ([base, delta], "no output folder"),
        ([base, delta, delta], "is a file"),
        ([base, delta, base], "is the base"),
    ]:
        assert main(["merge", *args]) == 2
        assert message in capsys.readouterr().err

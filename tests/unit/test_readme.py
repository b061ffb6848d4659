"""The README's library example runs as written (so the README cannot drift from the API)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_library_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "save_delta" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "delta.safetensors").is_file()
    assert not hasattr(namespace["plain"], "smt_bank")


def test_readme_opens_with_the_two_commands():
    head = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert head.splitlines()[0].startswith("make quickstart") and head.splitlines()[1].startswith("make test")


def test_readme_own_lightning_module_to_merged_model_runs(tmp_path, monkeypatch):
    """The README's "Your own LightningModule → delta file → merged transformers model" section, as written."""
    import torch

    section = README.read_text().split("### Your own LightningModule → delta file → merged transformers model", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    module, tuned, merged = namespace["module"], namespace["tuned"], namespace["merged"]
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits  # merged in place: the trained network
        assert torch.equal(merged.eval()(input_ids=ids).logits, expected)
        assert torch.allclose(tuned.eval()(input_ids=ids).logits, expected, atol=1e-3)  # Δ stored in bf16
        base = namespace["AutoModelForCausalLM"].from_pretrained("base").eval()(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-4)  # the delta changed the model
    assert not hasattr(module.model, "smt_bank") and namespace["smt"].selection.num_blocks == 4


def test_readme_debug_fit_line_gives_a_valid_callback(capsys, monkeypatch):
    """The README's ``smt fit --config configs/debug.yaml …`` line parses, and its ``--smt.*`` overrides build the
    callback (a density on top of the config's num_blocks must unset it: both set is refused)."""
    import shlex

    import yaml

    from smt.lightning.callback import SparseMatrixTuning
    from smt.lightning.cli import main

    line = next(text for text in README.read_text().splitlines() if text.startswith("smt fit --config configs/debug"))
    monkeypatch.chdir(README.parent)
    try:
        main([*shlex.split(line.split("#")[0])[1:], "--print_config"])
    except SystemExit as stop:
        assert stop.code in (0, None), capsys.readouterr().err
    smt = yaml.safe_load(capsys.readouterr().out)["smt"]
    assert SparseMatrixTuning(**smt).config.density == 0.02

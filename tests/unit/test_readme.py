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

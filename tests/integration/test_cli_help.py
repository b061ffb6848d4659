"""``smt --help`` lists every subcommand, and ``smt <command> --help`` documents each one."""

import pytest

from smt.lightning.cli import COMMANDS, main


def test_top_level_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "select", "export", "merge"):
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split(maxsplit=1)[1]) > 20  # a real summary, not just the name
    assert main([]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and ("--config" in out or command in ("export", "merge"))


def test_unknown_command_names_the_real_ones(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'frobnicate'" in err and "select" in err and "merge" in err


def test_fit_help_names_every_registered_criterion(capsys):
    """``--smt.criterion``'s help is a docstring: a criterion added to the registry must be added there too."""
    from smt.core.scoring import CRITERIA

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    criterion_help = out[out.index("--smt.criterion CRITERION block score:") :].split("(type:")[0]
    assert [name for name in CRITERIA if f"``{name}``" not in criterion_help] == []


def test_fit_help_shows_every_config_field_with_its_docstring(capsys):
    """``--smt.<field>`` for every ``CallbackConfig`` field, its help text the field's own docstring."""
    import ast
    import inspect
    from dataclasses import fields

    from smt.core.config import SMTConfig
    from smt.lightning.callback_config import CallbackConfig

    docs = {}
    for cls in (SMTConfig, CallbackConfig):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for field_node, doc in zip(body, body[1:]):
            if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr):
                docs[field_node.target.id] = " ".join(doc.value.value.split())
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field in fields(CallbackConfig):
        assert f"--smt.{field.name} " in out
        assert docs[field.name][:40] in out, field.name

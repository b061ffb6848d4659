"""One pattern convention: a regex matches the whole name, a list names suffixes; a pattern
that matches nothing is refused in one line that shows a real name and a pattern that would match it."""

import pytest
from helpers import TwoLayer, tiny_llama
from lightning.pytorch import LightningModule

from smt import SMTConfig, SparseMatrixTuning
from smt.core.model import find_targets, module_grids, plan_pools
from smt.core.patterns import name_matcher
from smt.core.placement import train_densely

Q = "model.layers.0.self_attn.q_proj"


def test_a_regex_matches_whole_names_and_a_list_matches_suffixes_at_dots():
    assert name_matcher(r".*self_attn\.(q|v)_proj", "f")(Q)
    assert not name_matcher("q_proj", "f")(Q) and name_matcher("q_proj", "f")("q_proj")
    assert name_matcher(["q_proj"], "f")(Q) and not name_matcher(["proj"], "f")(Q)
    with pytest.raises(ValueError, match=r"^f='\(' is not a valid regular expression"):
        name_matcher("(", "f")


def test_target_modules_written_for_search_get_the_name_and_the_fix():
    model = tiny_llama()
    assert len(find_targets(model, ".*q_proj")) == 2 == len(find_targets(model, ["q_proj"]))
    with pytest.raises(ValueError) as error:
        find_targets(model, "q_proj")
    message = str(error.value)
    assert "\n" not in message and f"inside '{Q}'" in message and "write '.*q_proj'" in message
    with pytest.raises(ValueError, match=r"names look like 'model\.layers\.0\.self_attn\.q_proj'.*\['q_proj'\]"):
        find_targets(model, "nothing_like_this")
    assert find_targets(model, "(?:" + "|".join([Q]) + ")").keys() == {Q}  # the regex smt writes for a saved file


def test_pool_patterns_follow_the_same_rule():
    grids = module_grids(find_targets(tiny_llama(), ["q_proj", "up_proj"]), 16)
    pools = {
        "attention": {"pattern": ".*self_attn.*", "num_blocks": 2},
        "mlp": {"pattern": ["up_proj"], "num_blocks": 1},
    }
    planned = plan_pools(SMTConfig(["q_proj", "up_proj"], 16, pools=pools), grids)
    assert [(p.name, len(p.modules)) for p in planned] == [("attention", 2), ("mlp", 2)]
    searching = {"attention": {"pattern": "self_attn", "num_blocks": 2}, "mlp": {"pattern": ".*mlp.*", "num_blocks": 1}}
    with pytest.raises(ValueError, match=r"smt\.pools\.attention\.pattern='self_attn'.*write '\.\*self_attn\.\*'"):
        plan_pools(SMTConfig(["q_proj", "up_proj"], 16, pools=searching), grids)


class _Head(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.head = TwoLayer(), TwoLayer(6, 4, 2)


@pytest.mark.parametrize("pattern", [r"head\..*", ["head.up"], r"head\.up\.bias"])
def test_trainable_modules_name_modules_or_parameters_in_full(pattern):
    module = _Head()
    callback = SparseMatrixTuning(["net.up"], block_size=4, num_blocks=1, trainable_modules=pattern)
    callback._add_bank(module, callback.target(module))
    train_densely(module, pattern, callback.target(module))  # what the callback's setup runs
    trained = {n for n, p in module.named_parameters() if p.requires_grad and "smt_bank" not in n}
    expected = {"head.up.bias"} if "bias" in str(pattern) else {"head.up.weight", "head.up.bias"}
    if pattern == r"head\..*":
        expected = {name for name, _ in module.head.named_parameters(prefix="head")}
    assert trained == expected


def test_trainable_modules_written_for_search_are_refused_with_an_example():
    module = _Head()
    callback = SparseMatrixTuning(["net.up"], block_size=4, num_blocks=1, trainable_modules="head")
    callback._add_bank(module, callback.target(module))
    with pytest.raises(ValueError, match=r"^smt\.trainable_modules='head'.*inside 'head\.up'; write 'head\.\*'$"):
        train_densely(module, callback.config.trainable_modules, callback.target(module))

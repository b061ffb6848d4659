"""The rank-agreement pieces of ``smt.lightning.distributed`` with a simulated second rank (no processes)."""

from pathlib import Path

import pytest
import torch

from smt.core.scoring import BlockScorer
from smt.kernels.blocks import BlockGrid
from smt.lightning.distributed import (
    check_same_selection,
    release_process_group,
    summed_scorer_states,
    zeroed_scorer_states,
)


def gather_from(*fingerprints: str):
    """An ``all_gather`` whose ranks hold ``fingerprints`` (rank order)."""
    rows = [torch.tensor(list(bytes.fromhex(f)), dtype=torch.int64) for f in fingerprints]
    return lambda mine: torch.stack(rows)


def test_equal_fingerprints_pass_and_a_single_process_passes():
    check_same_selection("00112233445566ff", gather_from("00112233445566ff", "00112233445566ff"))
    check_same_selection("00112233445566ff", lambda t: t)  # Lightning's single-device all_gather: no rank dim


def test_a_differing_rank_is_named_on_every_rank():
    gather = gather_from("00112233445566ff", "00112233445566ff", "ffffffffffffffff")
    for mine in ("00112233445566ff", "ffffffffffffffff"):  # rank 0's view and rank 2's view
        with pytest.raises(RuntimeError, match=r"ranks \[2\] selected other blocks than rank 0"):
            check_same_selection(mine, gather)


def test_checkpointed_scores_are_summed_but_the_live_ones_stay_this_ranks():
    scorer = BlockScorer(BlockGrid(8, 8, 4, 4), "grad_sq", "q_proj")
    scorer.observe(torch.ones(3, 8), torch.ones(3, 8))
    scorer.commit()
    live = scorer.total.clone()

    states = summed_scorer_states({"q_proj": scorer}, lambda t: t * 2)  # two ranks with equal scores
    assert torch.equal(states["q_proj"]["total"], 2 * live)
    assert torch.equal(scorer.total, live)
    zeroed = zeroed_scorer_states(states)["q_proj"]
    assert torch.equal(zeroed["total"], torch.zeros_like(live)) and zeroed["steps"] == states["q_proj"]["steps"]


def test_strategies_smt_cannot_train_correctly_are_refused_in_one_line():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from smt.core.config import RegrowthConfig
    from smt.lightning.distributed import check_strategy

    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), None, RegrowthConfig())
    cases = [
        (FSDPStrategy(), None, None, "FSDP1"),
        (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), None, None, "tensor_parallel_size=2"),
    ]

    def deepspeed(stage: int) -> DeepSpeedStrategy:
        # DeepSpeedStrategy() needs deepspeed installed (an optional extra, absent in CI); the check reads only
        # the ZeRO config, so a bare instance with that config tests the same refusals everywhere.
        strategy = object.__new__(DeepSpeedStrategy)
        strategy.config = {"zero_optimization": {"stage": stage}}
        return strategy

    cases += [
        (deepspeed(3), "sel.safetensors", None, "ZeRO-3"),
        (deepspeed(2), None, None, "smt select"),
        (deepspeed(2), "sel.safetensors", RegrowthConfig(), "smt.regrowth"),
    ]
    check_strategy(deepspeed(2), "sel.safetensors", None)  # what DeepSpeed supports
    for strategy, selection_path, regrowth, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            check_strategy(strategy, selection_path, regrowth)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_distributed_configs_parse_over_the_debug_config_and_show_their_command(name, capsys):
    import yaml

    from smt.lightning.cli import main

    repo = Path(__file__).resolve().parents[2]
    path = repo / "configs" / "distributed" / f"{name}.yaml"
    assert f"--config configs/distributed/{name}.yaml" in path.read_text().split("trainer:")[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(repo / "configs" / "debug.yaml"), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    # deepspeed, where installed, logs "[date] [WARNING] ..." lines to stdout on import: keep the YAML only
    printed = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("["))
    strategy = yaml.safe_load(printed)["trainer"]["strategy"]
    assert strategy["class_path"] == yaml.safe_load(path.read_text())["trainer"]["strategy"]["class_path"]


def test_a_finished_gloo_run_releases_its_process_group_and_a_second_release_is_a_no_op(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.distributed.all_reduce(torch.ones(2))  # the group has started its worker threads
    release_process_group()
    assert not torch.distributed.is_initialized()
    release_process_group()

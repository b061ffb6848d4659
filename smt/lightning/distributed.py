"""Keeping ranks in agreement: summed score state, one selection everywhere, strategies smt can run under.

Every rank taps its own shard of the data. Decisions need the sum over ranks ``S = Σ_r S_r``, and a checkpoint
(written by rank 0 alone) must carry that sum too: on resume rank 0 restarts from ``S`` and every other rank from
0, so the next reduction again gives the uninterrupted run's total. The EMA of regrowth's ``ma`` criterion is
linear in the scores, so the same holds for it.

It sits beside the callback (``smt.lightning.callback``) and knows Lightning's strategies; the core below does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from smt.core.regrowth import Regrower
from smt.core.scoring import BlockScorer

Reduce = Callable[[torch.Tensor], torch.Tensor]


# --- score state across ranks ------------------------------------------------------------------------


def summed_scorer_states(scorers: dict[str, BlockScorer], reduce: Reduce) -> dict[str, dict]:
    """State dicts of ``scorers`` with their totals summed over ranks (every rank must call this, in step)."""
    states = {}
    for name, scorer in scorers.items():
        twin = copy.copy(scorer)  # reduce a copy: the live totals keep counting only this rank's batches
        twin.total = None if scorer.total is None else scorer.total.clone()
        twin.reduce_(reduce)
        states[name] = twin.state_dict()
    return states


def summed_regrowth_state(regrower: Regrower, reduce: Reduce) -> dict:
    """``regrower.state_dict()`` with its open window's scores and its EMAs summed over ranks."""
    ema = {name: reduce(value.clone()).cpu() for name, value in regrower.ema.items()}
    return {**regrower.state_dict(), "scorers": summed_scorer_states(regrower.scorers, reduce), "ema": ema}


def zeroed_scorer_states(states: dict[str, dict]) -> dict[str, dict]:
    """What a rank other than 0 resumes from: the same shapes, no score (rank 0 carries the sum)."""
    return {
        name: {**state, "total": None if state["total"] is None else torch.zeros_like(state["total"])}
        for name, state in states.items()
    }


def zeroed_regrowth_state(state: dict) -> dict:
    """``zeroed_scorer_states`` for a ``Regrower.state_dict()``: its window scores and EMA zeroed, shapes kept."""
    return {
        **state,
        "scorers": zeroed_scorer_states(state["scorers"]),
        "ema": {name: torch.zeros_like(value) for name, value in state["ema"].items()},
    }


def sum_over_ranks(state: dict, scorers: dict[str, BlockScorer], regrower: Regrower | None, reduce: Reduce) -> None:
    """Put the rank-summed scores into the callback's checkpoint ``state`` (every rank calls; rank 0's is written)."""
    state["scorers"] = summed_scorer_states(scorers, reduce)
    if regrower is not None:
        state["regrowth"] = summed_regrowth_state(regrower, reduce)
    state["summed_over_ranks"] = True


def state_for_rank(state: dict, rank: int) -> dict:
    """What ``rank`` resumes from: rank 0 the summed scores of a ``sum_over_ranks`` state, every other rank 0."""
    if not state.get("summed_over_ranks") or rank == 0:
        return state
    state = {**state, "scorers": zeroed_scorer_states(state["scorers"])}
    if state.get("regrowth") is not None:
        state["regrowth"] = zeroed_regrowth_state(state["regrowth"])
    return state


# --- one selection on every rank -----------------------------------------------------------------------


def check_same_selection(fingerprint: str, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise on every rank unless every rank's selection has this ``fingerprint`` (16 hex digits).

    Every rank gathers every fingerprint, so all of them stop together (a one-sided error would leave the others
    waiting in the next collective).

    Raises:
        RuntimeError: the ranks selected different blocks; names the ranks that differ from rank 0.
    """
    mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.int64)
    gathered = all_gather(mine).reshape(-1, mine.numel())
    fingerprints = [bytes(row.tolist()).hex() for row in gathered]
    differing = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if differing:
        raise RuntimeError(
            f"smt: ranks {differing} selected other blocks than rank 0 (fingerprints {fingerprints}); "
            "block scores were not reduced identically across ranks"
        )


# --- strategies ------------------------------------------------------------------------------------------


def release_process_group() -> None:
    """Destroy torch.distributed's process groups, if any, once a run has finished on this rank.

    Lightning registers this at exit for NCCL only. Under gloo (every CPU run) the groups then die during
    interpreter shutdown, and gloo's worker threads can abort the process there (SIGABRT, "terminate called
    without an active exception") after a run that succeeded. Call it only after success: a rank that
    destroys its groups while another is still inside a collective can hang it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank past its last collective first: a peer that tears its connections down while this
        # rank still holds them open is what gloo's threads abort on.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def shards_in_configure_model(strategy) -> bool:
    """Whether the user's ``configure_model`` shards the network (FSDP2 through ``ModelParallelStrategy``).

    smt's layers and bank must exist before that, so the callback injects in ``setup`` instead of after it.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def builds_layers_in_configure_model(pl_module) -> bool:
    """Whether the LightningModule builds its layers in ``configure_model`` (smt then injects right after it).

    A module that builds its network in ``__init__`` (``SMTLanguageModel``: ``smt_builds_network_in_init``) only
    shards in ``configure_model``: smt injects in ``setup`` then.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if getattr(pl_module, "smt_builds_network_in_init", False):
        return False
    return is_overridden("configure_model", pl_module)


def run_after_configure_model(pl_module, then: Callable[[], None]) -> None:
    """Patch ``configure_model`` on the instance so ``then`` (injection) follows the user's layer building."""
    original = pl_module.configure_model

    def configure_model() -> None:  # no functools.wraps: Lightning's is_overridden must see an override
        original()
        then()
        pl_module.configure_model = original

    pl_module.configure_model = configure_model


def shard_network(network, mesh, unit_types: tuple[type, ...] = ()) -> None:
    """FSDP2 for a network smt has injected: each module of ``unit_types`` (e.g. decoder layers) its own unit, then
    ``network`` itself, whose unit holds ``smt_bank`` (call from ``configure_model`` under ``ModelParallelStrategy``).

    Frozen and trainable parameters may share a unit here: FSDP2 shards per parameter, so frozen weights get no
    gradient buffer (FSDP1's flat parameters would allocate one for all of them).
    """
    from torch.distributed.fsdp import fully_shard

    for module in network.modules():
        if unit_types and isinstance(module, unit_types) and module is not network:
            fully_shard(module, mesh=mesh)
    fully_shard(network, mesh=mesh)


def check_strategy(strategy, selection_path: str | None, regrowth) -> None:
    """Refuse, at setup, a strategy under which smt would train wrongly; one line saying what to use instead.

    Raises:
        ValueError: FSDP1 (``FSDPStrategy``), tensor parallelism, DeepSpeed ZeRO-3, or DeepSpeed with a warm-up
            or regrowth.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "smt: strategy 'fsdp' (FSDP1) is not supported: its flat parameters mix frozen weights and slots; "
            "use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) (FSDP2), see docs/distributed.md"
        )
    if isinstance(strategy, ModelParallelStrategy) and strategy._tensor_parallel_size not in (1, "auto"):
        raise ValueError(
            f"smt: ModelParallelStrategy(tensor_parallel_size={strategy._tensor_parallel_size}) splits the weights "
            "smt's blocks index; use tensor_parallel_size=1 (FSDP2 only)"
        )
    if isinstance(strategy, DeepSpeedStrategy):
        _check_deepspeed(strategy, selection_path, regrowth)


def _check_deepspeed(strategy, selection_path: str | None, regrowth) -> None:
    stage = strategy.config.get("zero_optimization", {}).get("stage", 0) if strategy.config else 0
    if stage >= 3:
        raise ValueError(
            "smt: DeepSpeed ZeRO-3 partitions the bank's slots, which smt's layers read outside the bank's forward; "
            "use ZeRO stage 1 or 2, or FSDP2 (ModelParallelStrategy)"
        )
    if selection_path is None:
        raise ValueError(
            "smt: under DeepSpeed the warm-up cannot drop gradients (DeepSpeed keeps them in its own buffers); "
            "run `smt select` on one device and pass smt.selection_path"
        )
    if regrowth is not None:
        raise ValueError(
            "smt.regrowth is not supported under DeepSpeed (slot moves would miss its fp32 partitions); "
            "use DDP or FSDP2, or leave regrowth off"
        )


def check_sharded_bank(network, strategy) -> None:
    """Under FSDP2 the bank must sit in the FSDP unit of ``network`` (the module holding it, whose ``forward``
    encloses every tuned layer): smt's layers read the slots outside the bank's own forward, so the slots must be
    unsharded whenever any layer runs, which is what the enclosing unit guarantees.

    Raises:
        ValueError: the bank is its own FSDP unit, or ``network`` is not an FSDP unit.
    """
    if not shards_in_configure_model(strategy):
        return
    from torch.distributed.fsdp import FSDPModule

    from smt.core.model import get_bank

    if isinstance(get_bank(network), FSDPModule):
        raise ValueError(
            "smt: do not fully_shard(smt_bank) on its own: smt's layers read the slots outside the bank's forward; "
            "let fully_shard of the network that holds it do it (see docs/distributed.md)"
        )
    if not isinstance(network, FSDPModule):
        raise ValueError(
            f"smt: under ModelParallelStrategy end configure_model with fully_shard({type(network).__name__}), the "
            "network that holds smt_bank (smt.submodule), so its forward unshards the slots"
        )

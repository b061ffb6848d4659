"""``smt.core.progress`` on hand-made cases: the no-op checks without Lightning."""

import pytest
import torch
from torch import nn

from smt.core.progress import (
    NothingTrainedError,
    ProgressCheck,
    check_gradients_reached,
    local_slots_moved,
    refuse_all_zero_delta,
    slots_learning_rate_positive,
)
from smt.core.scoring import BlockScorer
from smt.kernels.blocks import BlockGrid


def scorer(name: str, total: torch.Tensor | None, criterion: str = "grad_sq") -> BlockScorer:
    s = BlockScorer(BlockGrid(8, 8, 4, 4), criterion, name=name)
    s.total = total
    return s


def test_all_zero_gradient_scores_stop_and_partly_zero_ones_are_named():
    zero, some = torch.zeros(2, 2), torch.tensor([[0.0, 1e-30], [0.0, 0.0]])
    with pytest.raises(NothingTrainedError, match=r"^every block score of the 4-step warm-up is exactly 0.*\(a, b\)"):
        check_gradients_reached({"a": scorer("a", zero), "b": scorer("b", None)}, steps=4)
    assert check_gradients_reached({"a": scorer("a", zero), "b": scorer("b", some)}, steps=4) == ["a"]
    assert check_gradients_reached({"a": scorer("a", None, "random")}, steps=4) == []  # gradient-free: no check


def test_slots_moved_is_one_flag_without_a_host_sync():
    slots = [torch.zeros(2, 2), torch.zeros(2, 2)]
    assert local_slots_moved(slots).item() == 0.0 and local_slots_moved(slots).dim() == 0
    slots[1][0, 1] = -1e-12
    assert local_slots_moved(slots).item() == 1.0


def test_learning_rate_is_read_from_the_groups_that_hold_slots():
    slot, other = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [slot], "lr": 0.0}, {"params": [other], "lr": 0.1}])
    assert not slots_learning_rate_positive([optimizer], [slot])  # another group's lr does not train the slots
    optimizer.param_groups[0]["lr"] = 1e-6
    assert slots_learning_rate_positive([optimizer], [slot])


def test_progress_check_is_due_once_after_the_counted_steps_and_resumes():
    check = ProgressCheck(after=2)
    check.count_step(lr_positive=False)  # an lr-0 step is not counted
    check.count_step(lr_positive=True)
    assert not check.due and check.due_at_end
    resumed = ProgressCheck(after=2)
    resumed.load_state_dict(check.state_dict())
    resumed.count_step(lr_positive=True)
    assert resumed.due
    with pytest.raises(NothingTrainedError, match="after 2 tuning steps with lr > 0"):
        resumed.check(moved=False)
    assert not resumed.due and not resumed.due_at_end
    check.check(moved=True)
    check.count_step(lr_positive=True)
    assert not check.due and check.steps == 1  # checked once: no more counting, no more syncs
    assert not ProgressCheck(after=0).due_at_end
    with pytest.raises(ValueError, match=r"^smt.check_progress_after=-1 must be ≥ 0 \(0 = never check\)$"):
        ProgressCheck(after=-1)


def test_an_all_zero_delta_is_refused_in_one_line():
    refuse_all_zero_delta(True, "write d.safetensors")
    with pytest.raises(NothingTrainedError, match="refusing to write d.safetensors; check model.lr") as error:
        refuse_all_zero_delta(False, "write d.safetensors")
    assert "\n" not in str(error.value)

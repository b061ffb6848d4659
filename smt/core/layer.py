"""``SparseBlockLinear``: a Linear-like layer whose selected blocks carry a trainable Δ.

For input ``x`` ``[T, in]`` (any leading shape), frozen ``W0`` ``[out, in]`` and the layer's ``k`` slots:

    forward   y  = x · (W0 + scatter(Δ))ᵀ + b                 (materialize: one dense GEMM)
              y  = base(x) + Σ_b x[:, cols_b] · Δ_bᵀ            (additive: any base, e.g. 4-bit)
    backward  dx = g · (W0 + scatter(Δ))                      (dense, as usual)
              dΔ_b = Σ_t g[t, rows_b]ᵀ · x[t, cols_b]          (only the selected blocks)

Backward keeps a *copy* of only the input columns the selected blocks read, never the whole input;
a layer with no selected block saves nothing. No gradient of ``W0`` is formed unless ``W0`` itself requires grad
(a full warm-up, ``smt.warmup_updates=full``: ``dW0 = gᵀ · x`` from the whole input, which scoring keeps anyway).

During the warm-up (bank not tuning) the same function taps ``g`` and ``x`` into a ``BlockScorer``;
the slots get zero gradients (dropped before the optimizer step), so nothing is updated.

The wrapper registers the base module's own ``weight``/``bias`` under the same names and delegates
state-dict (de)serialisation to it, so state-dict keys are exactly the original model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smt.core.quant import is_quantized
from smt.core.scoring import BlockScorer
from smt.kernels import backend_for
from smt.kernels.blocks import BlockGrid, BlockPlan


@dataclass
class _Step:
    """What one call of the autograd functions needs besides tensors."""

    plan: BlockPlan | None
    ops: object
    scorer: BlockScorer | None
    transposed: bool
    train: bool
    weight: torch.Tensor | None = None


def _compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """Autocast's dtype when it is on for ``x``'s device (custom_fwd does this for one fixed device type)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def _logical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


class _MaterializedLinear(torch.autograd.Function):
    """y = x·(W0 + scatter Δ)ᵀ + b with block-only dΔ; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, anchor, step: _Step):
        dtype = _compute_dtype(x, weight.dtype)
        w0 = _logical(weight, step.transposed)
        w_eff = _effective_weight(w0, delta, step)
        x_c = x.to(dtype)  # under autocast the saved columns are kept in the compute dtype, as autocast would
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x_c, w_eff.to(dtype), None if bias is None else bias.to(dtype))
        _save(ctx, x_c, delta, step, keep_input=ctx.needs_input_grad[1])
        ctx.dtype, ctx.bias_shape, ctx.delta_input = dtype, None if bias is None else bias.shape, 3
        step.weight = w0
        return y

    @staticmethod
    def backward(ctx, dy):
        step, (x2d, x_cols, delta), g = ctx.step, ctx.saved_tensors, _flat(dy)
        dx = None
        if ctx.needs_input_grad[0]:
            w_eff = _effective_weight(step.weight, delta, step)
            dx = (g.to(ctx.dtype) @ w_eff.to(ctx.dtype)).view(*ctx.x_shape)
        dbias = g.sum(0).view(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        dweight = None
        if ctx.needs_input_grad[1]:  # a full warm-up trains W0 densely; the logical gᵀx, stored as the weight is
            dweight = (g.to(ctx.dtype).t() @ x2d.to(ctx.dtype)).to(step.weight.dtype)
            dweight = dweight.t() if step.transposed else dweight
        return dx, dweight, dbias, _delta_grad(ctx, g, x2d, x_cols, delta, step), None, None


class _AdditiveDelta(torch.autograd.Function):
    """y = y_base + Σ_b x[:, cols_b]·Δ_bᵀ with block-only dΔ; ``y_base = base(x)`` keeps its own autograd."""

    @staticmethod
    def forward(ctx, y_base, x, delta, anchor, step: _Step):
        y = y_base.clone()
        if step.plan is not None and step.train:  # in the warm-up Δ ≡ 0: nothing to add
            y2d = y.view(-1, y.shape[-1])
            step.ops.block_delta_matmul(x.reshape(-1, x.shape[-1]), delta, step.plan, y2d)
        _save(ctx, x.to(_compute_dtype(x, x.dtype)), delta, step)
        ctx.delta_input = 2
        return y

    @staticmethod
    def backward(ctx, dy):
        step, (x2d, x_cols, delta), g = ctx.step, ctx.saved_tensors, _flat(dy)
        dx = None
        if ctx.needs_input_grad[1] and step.plan is not None and step.train:
            dx2d = torch.zeros(g.shape[0], ctx.x_shape[-1], dtype=g.dtype, device=g.device)
            dx = step.ops.block_delta_matmul_t(g, delta, step.plan, dx2d).view(*ctx.x_shape)
        return dy, dx, _delta_grad(ctx, g, x2d, x_cols, delta, step), None, None


def _effective_weight(w0: torch.Tensor, delta: torch.Tensor | None, step: _Step) -> torch.Tensor:
    """``W0 + scatter(Δ)``; just ``W0`` while Δ ≡ 0 (the warm-up) or nothing is selected."""
    if step.plan is None or not step.train:
        return w0
    return step.ops.materialize(w0, delta, step.plan)


def _save(ctx, x: torch.Tensor, delta: torch.Tensor, step: _Step, keep_input: bool = False) -> None:
    """Keep what backward needs: the whole input only while scoring (or for a dense weight gradient), else a copy of
    the selected columns."""
    ctx.step, ctx.x_shape = step, x.shape
    x2d = x.reshape(-1, x.shape[-1])
    if step.scorer is not None or keep_input:
        ctx.save_for_backward(x2d, None, delta)
    elif step.plan is not None:
        ctx.save_for_backward(None, step.ops.gather_columns(x2d, step.plan), delta)
    else:
        ctx.save_for_backward(None, None, None)


def _flat(dy: torch.Tensor) -> torch.Tensor:
    """``dy`` as a contiguous ``[T, out]`` (autograd may hand over an expanded, stride-0 tensor)."""
    return dy.reshape(-1, dy.shape[-1]).contiguous()


def _delta_grad(ctx, g, x2d, x_cols, delta, step: _Step):
    if step.scorer is not None:
        step.scorer.observe(g, x2d, step.ops)
    if delta is None or not ctx.needs_input_grad[ctx.delta_input]:
        return None
    if not step.train:  # warm-up: the slots stay in the graph (DDP wants a gradient for each) but learn nothing;
        # 0·Σg carries an overflow into the slot gradient (no host sync), so fp16's GradScaler still backs off.
        return torch.zeros_like(delta) + (g.float().sum() * 0).to(delta.dtype)
    if x_cols is None:  # scoring while tuning (regrowth windows) kept the whole input
        x_cols = step.ops.gather_columns(x2d, step.plan)
    return step.ops.block_weight_grad(g, x_cols, step.plan).to(delta.dtype)


class SparseBlockLinear(nn.Module):
    """Wraps ``nn.Linear``, transformers ``Conv1D`` (transposed weight) or a bitsandbytes Linear.

    Args:
        base: the module to wrap (kept, unregistered, for its forward and state-dict format).
        grid: block grid of the logical ``[out, in]`` weight.
        transposed: the base stores its weight as ``[in, out]`` (GPT-2 ``Conv1D``).
        forward_mode: ``materialize`` or ``additive``.
        kernel: kernel setting passed to ``smt.kernels.backend_for``.
    """

    def __init__(self, base: nn.Module, grid: BlockGrid, transposed: bool, forward_mode: str, kernel: str) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # not a child: parameter names stay `<name>.weight`
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.grid, self.transposed, self.forward_mode, self.kernel = grid, transposed, forward_mode, kernel
        self.in_features, self.out_features = grid.in_features, grid.out_features
        self.quantized = is_quantized(base)  # its weight cannot hold W0 + Δ: merge() leaves it additive
        self.scorer: BlockScorer | None = None
        self.merged = False
        self._bank = None
        self._module_index = -1
        self._plan_key: tuple | None = None
        self._plan: BlockPlan | None = None
        self._merged_tiles: torch.Tensor | None = None
        self._merged_index: torch.Tensor | None = None

    def attach(self, bank, module_index: int) -> None:
        """Connect to the bank (not registered as a child: the bank is registered once, at the root)."""
        object.__setattr__(self, "_bank", bank)
        self._module_index = module_index

    # --- forward ------------------------------------------------------------------------------------

    def slot_ids(self) -> list[int]:
        return [] if self._bank is None else self._bank.slot_ids(self._module_index)

    def plan(self) -> BlockPlan | None:
        """The cached ``BlockPlan`` of this layer's slots, rebuilt when the bank's map changes."""
        key = (None if self._bank is None else self._bank.version, self.weight.device)
        if key != self._plan_key:
            ids = self.slot_ids()
            index = self._bank.index_of(self._module_index).to(self.weight.device) if ids else None
            self._plan = BlockPlan.build(self.grid, index) if ids else None
            self._plan_key = key
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self._bank
        scoring = self.scorer is not None and bank is not None
        if self.merged or bank is None or (not scoring and not self.slot_ids()):
            return self.base(x)
        plan = self.plan()
        ops = backend_for(self.kernel, x.device)
        delta = bank.stacked(self.slot_ids(), self.grid.tile_shape) if plan is not None else None
        if not scoring and not torch.is_grad_enabled():  # eval/generate: no weight copy, nothing saved
            return self._forward_no_grad(x, delta, plan, ops)
        step = _Step(plan, ops, self.scorer, self.transposed, bank.tuning)
        anchor = _anchor(x) if scoring else None  # keeps the tap in the graph when nothing else needs grad
        if self.forward_mode == "materialize":
            return _MaterializedLinear.apply(x, self.weight, self.bias, delta, anchor, step)
        return _AdditiveDelta.apply(self.base(x), x, delta, anchor, step)

    def _forward_no_grad(self, x: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, ops) -> torch.Tensor:
        """The training forward's math without autograd or saved columns (bit-equal to the merged model).

        For many calls on fixed Δ (generation), ``smt.core.merge.merged(model)`` avoids the per-call weight copy.
        """
        if self.forward_mode == "additive":
            y = self.base(x)
            ops.block_delta_matmul(x.reshape(-1, x.shape[-1]), delta, plan, y.view(-1, y.shape[-1]))
            return y
        dtype = _compute_dtype(x, self.weight.dtype)
        w_eff = ops.materialize(_logical(self.weight, self.transposed), delta, plan)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), w_eff.to(dtype), bias)

    # --- merge / unmerge / delta ------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """Dense Δ of this layer in the logical ``[out, in]`` layout, fp32."""
        dense = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        if self.slot_ids():
            delta = self._bank.stacked(self.slot_ids(), self.grid.tile_shape).detach()
            self.grid.scatter_add_(dense, self.plan().index, delta.float())
        return dense

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W0 + Δ`` into the weight (rounded once); keeps the original tiles for an exact ``unmerge``.

        A quantized base cannot hold ``W0 + Δ``: it is left as it is and its forward keeps adding Δ (so a merged
        model computes the same function either way).
        """
        if self.merged or self.quantized:
            return
        if self.slot_ids():
            w = _logical(self.weight, self.transposed)
            index = self.plan().index
            self._merged_tiles, self._merged_index = self.grid.gather(w, index).clone(), index.clone()
            delta = self._bank.stacked(self.slot_ids(), self.grid.tile_shape).detach().float()
            self.grid.scatter_(w, index, self._merged_tiles.float() + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight bit for bit."""
        if not self.merged:
            return
        if self._merged_tiles is not None:  # the blocks merged then, even if the bank moved since
            self.grid.scatter_(_logical(self.weight, self.transposed), self._merged_index, self._merged_tiles)
        self._merged_tiles, self._merged_index, self.merged = None, None, False

    # --- state dict: exactly the base module's keys ---------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.base._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self.base._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        g = self.grid
        return (
            f"{g.out_features}×{g.in_features}, blocks {g.block_rows}×{g.block_cols} "
            f"({g.n_row_blocks}×{g.n_col_blocks}), "
            f"selected={len(self.slot_ids())}, forward={self.forward_mode}, base={type(self.base).__name__}"
        )


def _anchor(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor that requires grad: makes the tap's output require grad even for a first layer."""
    return torch.empty(0, device=x.device, requires_grad=True)

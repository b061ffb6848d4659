"""Typed configuration of Sparse Matrix Tuning: each setting is declared here once, and its docstring is the
``--help`` text of ``smt fit`` (``--smt.<field>``; the callback's own settings extend this class in
``smt.lightning.callback_config``).

Every check that needs no model runs in ``__post_init__``, so a bad value stops a run before any model loads, with
one line that names the field and the fix. Checks against the model's shapes (a block larger than a weight, a budget
above the eligible blocks) run where the shapes are known.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from smt.core.scoring import get_criterion  # the registry: a criterion added with register_criterion is accepted
from smt.kernels import KERNEL_CHOICES
from smt.kernels.blocks import block_pair

FORWARD_MODES = ("auto", "materialize", "additive")
ALLOCATIONS = ("global", "proportional")
DELTA_DTYPES = ("float32", "bfloat16", "float16")
WARMUP_UPDATES = ("none", "full")
DEFAULT_DENSITY = 0.01


@dataclass
class PoolConfig:
    """A group of target modules with a budget of its own (SMT gives attention and MLP separate budgets)."""

    pattern: str | list[str]
    """Which target modules belong here, matched like ``target_modules``: one regex matched against the whole
    module name (``.*self_attn\\..*``), or a list of name suffixes (``[q_proj, k_proj, v_proj]``)."""
    num_blocks: int | None = None
    """Blocks for this pool (set this or ``density``)."""
    density: float | None = None
    """Fraction of this pool's targeted parameters to tune (set this or ``num_blocks``)."""

    def __post_init__(self) -> None:
        _check_budget(self.num_blocks, self.density, f"smt.pools[{self.pattern!r}]", required=True)


@dataclass
class SMTConfig:
    """What to tune and how blocks are chosen.

    Example:
        >>> SMTConfig(target_modules=["v_proj"], block_size=256, density=0.01).block_size
        256
    """

    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    """Modules whose weights get blocks: a list of name suffixes (``["q_proj", "v_proj"]``) or one regular
    expression matched against the **whole** module name (``.*self_attn\\.(q|v)_proj``; PEFT's convention, shared
    by every pattern smt takes). Default: attention q, k, v (SMT's best finding)."""
    block_size: int | tuple[int, int] = 256
    """Block shape ``(rows, cols)`` or one int for square blocks; ``-1`` = the full dimension (strips:
    ``[1, -1]`` selects output channels, S²FT-style). Larger = faster kernels, coarser selection."""
    num_blocks: int | None = None
    """Total blocks to tune (set one of ``num_blocks``, ``density``, ``budget_lora_rank``)."""
    density: float | None = None
    """Fraction of targeted parameters to tune, e.g. 0.01 (default 0.01 when no budget is set)."""
    budget_lora_rank: int | None = None
    """As many blocks as LoRA of this rank has weights on the same targets: rank r on an out×in matrix is
    r·(out + in) weights (``smt.core.selection.lora_equal_blocks``), e.g. 8 to compare with LoRA r=8."""
    pools: dict[str, PoolConfig] | None = None
    """Separate budgets per named pool of modules (e.g. ``attention`` and ``mlp``); replaces the global
    budget. A target module belongs to the first pool whose pattern (full match, or suffix list) it matches."""
    max_blocks_per_module: int | None = None
    """Upper limit on blocks in any one module (None = no limit)."""
    min_blocks_per_module: int = 0
    """Lower limit on blocks in every targeted module (the best blocks of each module are kept first)."""
    allocation: str = "global"
    """How the budget is split over modules: ``global`` (the best-scoring blocks anywhere: the budget follows the
    warm-up's gradients, which pile into a few modules and input columns) or ``proportional`` (each module gets blocks
    in proportion to its weights, as LoRA gives every module the same rank, and the scores choose which of its
    blocks). Measured (README "SMT or LoRA?"): level on short instruction tuning, less forgetting in every setting
    measured, and on new facts with every linear layer targeted WikiText-2 NLL 4.21 vs 6.08: use ``proportional``
    there. Not with fewer blocks than modules: shares under one block are settled by module order, not by score (the
    quickstart's 40 blocks over 90 modules: held-out loss 1.229 vs 1.138 with ``global``)."""
    warmup_steps: int = 100
    """Optimizer steps of scoring before selection (nothing is updated during them unless ``warmup_updates=full``)."""
    warmup_updates: str = "none"
    """What the warm-up trains: ``none`` (only scores; the weights stay W0) or ``full`` (the paper's code: every
    weight of the network that holds the bank trains densely while the scores accumulate, and the blocks then tune
    on the warmed weights). ``full`` holds full fine-tuning's gradients and optimizer state for the warm-up (freed at
    selection), needs ``model.slim_checkpoints=false``, a float base, and DDP with ``find_unused_parameters=True``;
    its delta file needs the warmed base written beside it (``<delta>.warm_base``) to rebuild the model."""
    warmup_lr: float | None = None
    """Learning rate of the dense weights during a ``full`` warm-up (constant; None = the optimizer's LR). The
    paper's runs used 9.65e-6."""
    criterion: str = "grad_sq"
    """block score: ``grad_sq`` (Σ of squared block gradients per micro-batch, memory-light), ``grad_mean_abs``
    (|mean of the summed gradient|, memory-light), ``grad_abs_mean`` (mean |summed gradient|, SMT's README
    choice: exact, keeps one fp32 accumulator the size of each weight), ``grad_l1`` (Σ|block gradient| per
    micro-batch, the memory-light upper bound of ``grad_abs_mean``), ``grad_snr`` (mean per-weight signal-to-noise
    of the tokens' gradients: scale-free), ``grad_sq_xnorm`` (``grad_sq`` over the energy of the block's input
    columns), ``weight_abs_mean``, ``random`` (see ``smt.core.scoring``)."""
    accumulator_device: str | None = None
    """Where ``grad_abs_mean`` keeps its weight-sized accumulators (``cpu`` offloads them); None = with the weight."""
    forward: str = "auto"
    """How Δ enters the forward: ``materialize`` (W0+Δ in one dense GEMM), ``additive`` (base(x) + block
    matmul; quantized or sharded bases), ``auto`` (materialize for plain float weights, else additive)."""
    kernel: str = "auto"
    """Block kernels: ``auto`` (Triton on CUDA when available), ``torch`` (reference), ``triton`` (forced)."""
    delta_dtype: str = "float32"
    """dtype of the trainable Δ slots (fp32 master weights by default, whatever the base dtype)."""
    seed: int = 0
    """Seed of the ``random`` criterion."""

    def __post_init__(self) -> None:
        if isinstance(self.block_size, list):
            self.block_size = tuple(self.block_size)
        block_pair(self.block_size)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("smt.target_modules is empty; name at least one module, e.g. ['v_proj']")
        if self.pools:
            if self.num_blocks is not None or self.density is not None or self.budget_lora_rank is not None:
                raise ValueError("smt.pools replaces smt.num_blocks/density/budget_lora_rank; set only one of them")
            self.pools = {name: PoolConfig(**p) if isinstance(p, dict) else p for name, p in self.pools.items()}
        else:
            _check_budget(self.num_blocks, self.density, "smt", required=False)
        if self.budget_lora_rank is not None:
            if self.num_blocks is not None or self.density is not None:
                raise ValueError("smt.budget_lora_rank is a budget of its own; unset smt.num_blocks/smt.density")
            if self.budget_lora_rank < 1:
                raise ValueError(f"smt.budget_lora_rank={self.budget_lora_rank} must be ≥ 1")
        get_criterion(self.criterion)
        _check_choice(self.allocation, ALLOCATIONS, "allocation")
        _check_choice(self.forward, FORWARD_MODES, "forward")
        _check_choice(self.kernel, KERNEL_CHOICES, "kernel")
        _check_choice(self.delta_dtype, DELTA_DTYPES, "delta_dtype")
        if self.warmup_steps < 0:
            raise ValueError(f"smt.warmup_steps={self.warmup_steps} must be ≥ 0")
        _check_choice(self.warmup_updates, WARMUP_UPDATES, "warmup_updates")
        if self.warmup_updates == "full" and self.warmup_steps == 0:
            raise ValueError("smt.warmup_updates=full needs smt.warmup_steps ≥ 1 (the steps of dense training)")
        if self.warmup_lr is not None and (self.warmup_updates != "full" or not self.warmup_lr > 0):
            raise ValueError(f"smt.warmup_lr={self.warmup_lr} needs smt.warmup_updates=full and a value > 0")
        if self.max_blocks_per_module is not None and self.max_blocks_per_module < max(1, self.min_blocks_per_module):
            raise ValueError(
                f"smt.max_blocks_per_module={self.max_blocks_per_module} is below "
                f"min_blocks_per_module={self.min_blocks_per_module}; raise it or drop the limit"
            )

    @property
    def budget_density(self) -> float | None:
        """The density budget in force (the default when no budget was set)."""
        if self.num_blocks is None and self.density is None and self.budget_lora_rank is None and not self.pools:
            return DEFAULT_DENSITY
        return self.density


def _check_budget(num_blocks: int | None, density: float | None, prefix: str, required: bool) -> None:
    if num_blocks is not None and density is not None:
        raise ValueError(f"{prefix}.num_blocks and {prefix}.density are both set; keep one of them")
    if required and num_blocks is None and density is None:
        raise ValueError(f"{prefix} needs a budget: set num_blocks or density")
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"{prefix}.num_blocks={num_blocks} must be ≥ 1; a zero budget would tune nothing")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"{prefix}.density={density} must be in (0, 1], e.g. 0.01 for 1 %")


def _check_choice(value: str, choices: Collection[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"smt.{name}={value!r} is not one of {', '.join(choices)}")


REGROWTH_SCHEDULES = ("linear", "cosine", "constant")
REGROWTH_CRITERIA = ("ag", "ma")
PRUNE_CRITERIA = ("delta_norm", "delta_change")


@dataclass
class RegrowthConfig:
    """SpIEL-style dynamic prune-and-regrow of blocks during tuning (shapes never change).

    Every ``every`` optimizer steps, each module drops the fraction p(t) of its blocks with the lowest prune
    score and grows as many unselected blocks with the highest growth score, scored over the last
    ``accumulate`` steps. Grown blocks start at Δ = 0 with fresh optimizer state.
    """

    every: int = 20
    """R: optimizer steps between events."""
    accumulate: int = 5
    """A: steps of block-gradient scoring before each event (≤ every). More = steadier, ~A/R extra backward cost."""
    rate: float = 0.2
    """Initial fraction of each module's blocks replaced per event."""
    schedule: str = "linear"
    """How the rate decays: ``linear`` (to 0 at ``until``), ``cosine``, ``constant``."""
    until: int | None = None
    """Last step with events (default: the run's last step, ``trainer.max_steps``)."""
    criterion: str = "ag"
    """Growth score: ``ag`` (fp32 squared block gradients summed over the window) or ``ma`` (their EMA)."""
    ma_decay: float = 0.9
    """EMA decay per scored step for ``ma``."""
    prune: str = "delta_norm"
    """Prune score: ``delta_norm`` (‖Δ_b‖ from the pretrained weight) or ``delta_change`` (how far Δ_b moved since the
    previous event: blocks that stopped learning go first)."""

    def __post_init__(self) -> None:
        if self.every < 1 or not 1 <= self.accumulate <= self.every:
            raise ValueError(
                f"smt.regrowth: every={self.every}, accumulate={self.accumulate}; "
                "need every ≥ 1 and 1 ≤ accumulate ≤ every"
            )
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"smt.regrowth.rate={self.rate} must be in [0, 1]")
        if not 0.0 <= self.ma_decay < 1.0:
            raise ValueError(f"smt.regrowth.ma_decay={self.ma_decay} must be in [0, 1)")
        _check_choice(self.schedule, REGROWTH_SCHEDULES, "regrowth.schedule")
        _check_choice(self.criterion, REGROWTH_CRITERIA, "regrowth.criterion")
        _check_choice(self.prune, PRUNE_CRITERIA, "regrowth.prune")

"""Triton versions of the block-sparse ops, same names, signatures and results as ``smt.kernels.reference``.

``smt.kernels.backend_for`` imports this package and uses every op it exports here; the others
(``gather_columns``, ``materialize``) stay on the reference: they are memory-bound index copies, and a
Triton port has not been measured to beat them.

- ``block_weight_grad``: grouped GEMM over the selected blocks, split-K when few (``block_grad``).
- ``block_scores``: per-block ``Σ|gᵀx|`` / ``Σ (gᵀx)²`` fused into the GEMM epilogue (``block_scores``).
- ``block_delta_matmul`` / ``block_delta_matmul_t``: additive-path products grouped by output block
  (``delta_matmul``).

Importing this package defines kernels only; nothing is compiled or launched until an op is called.
"""

from smt.kernels.triton.block_grad import block_weight_grad
from smt.kernels.triton.block_scores import block_scores
from smt.kernels.triton.delta_matmul import block_delta_matmul, block_delta_matmul_t

__all__ = ["block_weight_grad", "block_scores", "block_delta_matmul", "block_delta_matmul_t"]

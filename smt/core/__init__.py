"""The method, in pure torch (no Lightning): block scores, selection, the bank of slots, the wrapped layer, inject /
apply / merge, regrowth, quantized bases, and the file helpers selections use.

Imports point down only: ``smt.kernels`` ← ``smt.core`` ← ``smt.adapters`` / ``smt.eval`` ← ``smt.lightning``
(enforced by ``tests/unit/test_architecture.py``). Import the modules themselves (``smt.core.model``); this package
re-exports nothing, so importing it costs nothing.
"""

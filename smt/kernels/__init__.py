"""The one dispatch seam for block-sparse kernels.

Every op has a PyTorch reference (``smt.kernels.reference``); ``smt.kernels.triton`` may provide a
faster version of any of them under the same name and signature. ``backend_for(kernel, device)``
returns a namespace with one callable per op:

- ``kernel="torch"``: the reference everywhere.
- ``kernel="triton"``: Triton for every op it implements (reference for the rest); an error where
  Triton cannot run (no CUDA tensor, unless ``TRITON_INTERPRET=1`` for testing on CPU).
- ``kernel="auto"``: Triton on CUDA tensors when it imports, the reference otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from types import SimpleNamespace

import torch

from smt.kernels import reference

KERNEL_CHOICES = ("auto", "torch", "triton")
OPS = (
    "gather_columns",
    "block_weight_grad",
    "block_scores",
    "block_delta_matmul",
    "block_delta_matmul_t",
    "materialize",
)


def triton_available(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls are ~3× faster than
    fp32; on AVX2-only CPUs they are 30–50× slower, so bf16 is only worth choosing where this is true."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    native = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private names)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in native)


def backend_for(kernel: str, device: torch.device | str) -> SimpleNamespace:
    """The ops to use for tensors on ``device`` under the ``kernel`` setting.

    Raises:
        ValueError: ``kernel`` is not one of ``KERNEL_CHOICES``, or ``"triton"`` is forced where it cannot run.
    """
    device = torch.device(device)
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"smt.kernel={kernel!r} is not one of {KERNEL_CHOICES}")
    use_triton = kernel == "triton" or (kernel == "auto" and device.type == "cuda")
    if use_triton and not triton_available(device):
        if kernel == "auto":
            use_triton = False
        else:
            raise ValueError(
                f"smt.kernel='triton' cannot run on {device.type} tensors here (needs CUDA and the triton package, "
                "or TRITON_INTERPRET=1 set before triton is imported); use kernel='auto' or 'torch'"
            )
    return _backend(use_triton)


@lru_cache(maxsize=2)
def _backend(use_triton: bool) -> SimpleNamespace:
    fast = importlib.import_module("smt.kernels.triton") if use_triton else None
    ops = {name: getattr(fast, name, None) or getattr(reference, name) for name in OPS}
    return SimpleNamespace(name="triton" if use_triton else "torch", **ops)

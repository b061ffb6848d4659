"""Taking Δ out of a tuned model: the delta file, deltas on a plain base (``DeltaSet``, ``smt merge``), merged
models (float or quantized bases), and PEFT exports (SHiRA exact, LoRA by SVD). Built on ``smt.core``; no Lightning.
"""

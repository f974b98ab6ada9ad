"""clo_kernels: Triton kernels for the fused LM-head + log-prob gathering (imported as `clo_kernels`).

`linear_logprobs.py` holds the @triton.jit kernels, `launch.py` the host-side launchers. Autograd and
dispatch live in `clo_fast.ops`.
"""

from .launch import backward, default_chunk_cols, default_chunk_rows, forward, interpreting

__all__ = ["forward", "backward", "default_chunk_cols", "default_chunk_rows", "interpreting"]

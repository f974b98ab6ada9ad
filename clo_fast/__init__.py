"""clo-fast: Cross-Lingual Optimization with a fused LM-head + loss (see README.md, docs/INTERFACES.md)."""

from clo_fast.numerics import pin_if_entry_point

__version__ = "0.1.0"

# A clo-fast command (train.py, python -m clo_fast.*, clo-fast-*) pins torch's CPU kernels before anything
# imports torch, so its numbers are the same on every x86 CPU; a library import changes nothing (numerics.py).
pin_if_entry_point()

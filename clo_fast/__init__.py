"""clo-fast: Cross-Lingual Optimization with a fused LM-head + loss (see README.md, docs/INTERFACES.md)."""

__version__ = "0.1.0"

"""Infinization's benchmark suite: ``python -m bench`` (``--quick`` for a small run); see docs/performance.md."""

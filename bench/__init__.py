"""Benchmarks of unlockd (``python -m bench [NAME ...]``, ``make bench``)."""

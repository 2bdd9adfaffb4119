"""Helpers for tests, benchmarks and the demo: tiny random reference checkpoints built with transformers.

Everything here needs the `test` extra (PyTorch and transformers' modeling code); the package itself
never imports this module.
"""

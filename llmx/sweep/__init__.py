"""Hyper-parameter search and autotuning over `python -m llmx.train` runs (`python -m llmx.sweep`).

Needs the `sweep` extra (Optuna); `sweep.backend=ray` also the `ray` extra. The trainer never imports
this package.
"""

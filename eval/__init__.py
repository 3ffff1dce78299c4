"""Evaluation on a live model or any checkpoint: held-out perplexity and loss by position, passkey
retrieval, MQAR recall (eval/tasks.py runs them), and an lm-evaluation-harness adapter (eval/lm_harness.py).

    figures = run_tasks(cfg, model, dataset, device, autocast_dtype, progress, plot_dir)   # flat dict
    python -m eval checkpoint=DIR tasks=[ppl,passkey,mqar] out=DIR
"""
import importlib

# Imported on first use: configs/schema.py imports eval.config, which must not pull in torch and matplotlib.
LAZY = {"run_tasks": "eval.tasks", "evaluate_tasks": "eval.tasks", "TaskResult": "eval.results"}

__all__ = list(LAZY)


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'eval' has no attribute '{name}'")

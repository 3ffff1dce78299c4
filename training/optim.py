"""AdamW and the learning-rate schedule.

The schedule is a pure function of the step, so the step in a checkpoint is the whole scheduler state
and a resumed run sets exactly the learning rates the uninterrupted run would have.
"""
import math

import torch

from configs.schema import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and gate biases are not decayed)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, WSD or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    final = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return final + (cfg.lr - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: warmup, stable at the peak, then a linear decay over the last decay_fraction of the run
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)
    if step < decay_start:
        return cfg.lr
    progress = (step + 1 - decay_start) / max(1, max_steps - decay_start)  # the last step reaches `final`
    return cfg.lr + (final - cfg.lr) * min(1.0, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

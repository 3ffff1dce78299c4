"""The evaluation tasks by name, and the one function that runs the configured ones on a live model:
at the end of training, every train.eval_every steps, and in `python -m eval` on a checkpoint.

Every rank calls it (a sharded model's forward needs them all); only rank 0 passes progress and plot_dir.
"""
from pathlib import Path
from typing import Optional

import torch

from configs.errors import ConfigError
from eval import mlm, mqar, passkey, perplexity, state_tracking
from eval.config import DEFAULT_TASKS, ENCODER_TASKS
from eval.results import TaskResult, flat_figures

TASK_RUNNERS = {"ppl": perplexity.run, "passkey": passkey.run, "mqar": mqar.run, "state_tracking": state_tracking.run,
                "mlm": mlm.run}
TASK_CHECKS = {"ppl": perplexity.check, "passkey": passkey.check, "mqar": mqar.mqar_settings,
               "state_tracking": state_tracking.state_tracking_settings, "mlm": mlm.check}


def configured_tasks(cfg) -> list[str]:
    """eval.tasks, or what the data is for: ppl for text (mlm for an encoder), else the generated task's own (mqar,
    passkey, state_tracking)."""
    if cfg.eval.tasks is not None:
        return list(cfg.eval.tasks)
    return list(ENCODER_TASKS) if cfg.model.is_encoder else DEFAULT_TASKS.get(cfg.data.source, ["ppl"])


def check_model_kind(cfg, names: list[str]) -> None:
    """An encoder runs only the encoder tasks (mlm), a causal model only the others: one line otherwise."""
    encoder = cfg.model.is_encoder
    wrong = [name for name in names if (name in ENCODER_TASKS) != encoder]
    if wrong:
        kind = ("an encoder (bidirectional), which has no decoding and sees the tokens these tasks predict; "
                f"its task is {', '.join(ENCODER_TASKS)}") if encoder else "causal; mlm needs an encoder"
        raise ConfigError(f"eval.tasks: {', '.join(wrong)}: the model is {kind}")


def evaluate_tasks(cfg, model, dataset, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                   progress: bool = True) -> list[TaskResult]:
    names = configured_tasks(cfg)
    check_model_kind(cfg, names)
    for name in names:  # every task's settings are checked before the first one runs
        TASK_CHECKS[name](cfg, dataset)
    return [TASK_RUNNERS[name](cfg, model, dataset, device, autocast_dtype, progress) for name in names]


def run_tasks(cfg, model, dataset, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
              progress: bool = True, plot_dir: Optional[Path] = None) -> dict:
    """Run cfg's eval tasks on `model`; return their flat figures (held_out_loss, held_out_bpb,
    ppl_loss_beyond_train_len, passkey_accuracy, mqar_accuracy, state_tracking_accuracy_<L>, ...) and draw their PNGs into plot_dir."""
    results = evaluate_tasks(cfg, model, dataset, device, autocast_dtype, progress)
    if plot_dir is not None:
        for result in results:
            if result.plot is not None:
                result.plot(Path(plot_dir))
    return flat_figures(results)

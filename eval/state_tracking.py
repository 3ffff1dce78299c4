"""The state_tracking task: the word problem of a group (parity, S3, S5; data/synthetic.py) at the training
length and beyond it.

For each test length L, num_examples sequences of L random group elements; the model reads each in one
forward pass and predicts the running product at every position. The figure per length is the accuracy at
the last position, the product of all L elements (the word problem of length L; chance is 1 / |G|);
the per-position accuracy at the longest length is kept for the plot.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.errors import ConfigError
from data.config import check_group
from data.synthetic import group_order, state_tracking_set
from eval.results import TaskResult, plt, save_figure


def state_tracking_settings(cfg, dataset) -> dict:
    """eval.state_tracking with its nulls resolved: data=state_tracking's group (else parity), lengths
    train.seq_len x 1, 2, 4."""
    s, seq_len = cfg.eval.state_tracking, cfg.train.seq_len
    group = s.group or (cfg.data.group if cfg.data.source == "state_tracking" else "parity")
    check_group(group, "eval.state_tracking.group")
    vocab = dataset.tokenizer.vocab_size if dataset.tokenizer is not None else dataset.vocab_size
    if group_order(group) > vocab:
        raise ConfigError(f"eval.state_tracking.group={group} has {group_order(group)} elements, more than the "
                          f"run's vocabulary {vocab}")
    lengths = sorted(set(s.lengths or [seq_len, 2 * seq_len, 4 * seq_len]))
    return {"group": group, "lengths": lengths, "num_examples": s.num_examples, "seed": s.seed,
            "train_seq_len": seq_len}


@torch.no_grad()
def state_tracking_accuracy(model, settings: dict, batch_size: int, device: torch.device, autocast_dtype=None,
                            progress: bool = True) -> dict:
    """{length: (accuracy of the last position, accuracy per position [length])}."""
    was_training = model.training
    model.eval()
    results = {}
    for length in tqdm(settings["lengths"], desc="state tracking", disable=not progress, leave=False):
        inputs, labels = state_tracking_set(settings["seed"], settings["num_examples"], settings["group"], length)
        inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
        correct = torch.zeros(length)
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                predicted = model(batch).argmax(-1).cpu()
            correct += (predicted == labels[start:start + batch_size]).sum(0)
        per_position = (correct / len(inputs)).numpy()
        results[length] = (float(per_position[-1]), per_position)
    model.train(was_training)
    return results


def run(cfg, model, dataset, device, autocast_dtype=None, progress=True) -> TaskResult:
    settings = state_tracking_settings(cfg, dataset)
    results = state_tracking_accuracy(model, settings, cfg.eval.batch_size, device, autocast_dtype, progress)
    figures = {f"state_tracking_accuracy_{length}": final for length, (final, _) in results.items()}
    longest = max(results)
    curve = results[longest][1]
    details = {"accuracy_by_length": {str(length): final for length, (final, _) in results.items()},
               "accuracy_by_position": curve.tolist()}
    return TaskResult("state_tracking", settings, figures, details,
                      lambda out: plot_state_tracking(curve, settings, out))


def plot_state_tracking(per_position: np.ndarray, settings: dict, out_dir: Path) -> Path:
    """Accuracy of the running product by position (the longest test length), the training length dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(np.arange(1, len(per_position) + 1), per_position, lw=1.2)
    ax.axvline(settings["train_seq_len"], color="k", ls="--", lw=1, label=f"training length {settings['train_seq_len']}")
    ax.axhline(1 / group_order(settings["group"]), color="gray", ls=":", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("position (elements read)")
    ax.set_ylabel("accuracy of the product")
    ax.set_title(f"state tracking: {settings['group']}")
    ax.legend(loc="lower left", frameon=False)
    return save_figure(fig, out_dir / "state_tracking.png")

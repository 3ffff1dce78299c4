"""The passkey task: retrieve a 5-digit key hidden in filler text, over prompt length x needle depth.

Each cell of the grid holds `keys_per_cell` prompts (data/synthetic.py builds them with the run's
tokenizer); the model continues each greedily through its own stateful generation (`LM.generate`:
prefill, then one decode step per token) and is right when its continuation starts with exactly the key.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.errors import ConfigError
from data.synthetic import PASSKEY_DIGITS, PasskeyPrompts, passkey_correct, random_passkey
from eval.results import TaskResult, plt, save_figure


def passkey_lengths(cfg) -> list[int]:
    seq_len = cfg.train.seq_len
    return list(cfg.eval.passkey.lengths or [seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len])


@torch.no_grad()
def passkey_grid(model, tokenizer, lengths: list[int], depths: list[float], keys_per_cell: int, seed: int,
                 jrt: bool, device: torch.device, autocast_dtype=None, progress: bool = True) -> dict:
    """Accuracy [depth][length], the prompts' token counts per length, and every continuation."""
    prompts = PasskeyPrompts(tokenizer)
    new_tokens = len(prompts.answer("0" * PASSKEY_DIGITS)) + 1
    rng = np.random.default_rng(seed)
    accuracy = np.zeros((len(depths), len(lengths)))
    prompt_tokens, outputs = [], []
    was_training = model.training
    model.eval()
    cells = [(i, j) for j in range(len(lengths)) for i in range(len(depths))]
    for i, j in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        n_fillers = prompts.fillers_for(lengths[j])
        keys = [random_passkey(rng) for _ in range(keys_per_cell)]
        rows = [[tokenizer.eos_id] + prompts.prompt(n_fillers, depths[i], key, jrt) for key in keys]
        if i == 0:
            prompt_tokens.append(len(rows[0]))
        # Prompts of one length decode as one batch (keys of another token count go in their own).
        for length in sorted({len(r) for r in rows}):
            group = [k for k, r in enumerate(rows) if len(r) == length]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model.generate(torch.tensor([rows[k] for k in group], device=device), new_tokens)
            for k, continuation in zip(group, out[:, length:].tolist()):
                text = tokenizer.decode(continuation)
                correct = passkey_correct(text, keys[k])
                accuracy[i, j] += correct / keys_per_cell
                outputs.append({"length": lengths[j], "depth": depths[i], "key": keys[k], "output": text,
                                "correct": correct})
    model.train(was_training)
    return {"accuracy": accuracy, "prompt_tokens": prompt_tokens, "outputs": outputs}


def check(cfg, dataset) -> None:
    if dataset.tokenizer is None:
        raise ConfigError(f"eval.tasks: passkey needs text, and data.source={cfg.data.source} has no tokenizer")


def run(cfg, model, dataset, device, autocast_dtype=None, progress=True) -> TaskResult:
    check(cfg, dataset)
    s, lengths = cfg.eval.passkey, passkey_lengths(cfg)
    grid = passkey_grid(model, dataset.tokenizer, lengths, list(s.depths), s.keys_per_cell, s.seed, s.jrt, device,
                        autocast_dtype, progress)
    accuracy, seq_len = grid["accuracy"], cfg.train.seq_len
    within = [j for j, length in enumerate(lengths) if length <= seq_len]
    figures = {"passkey_accuracy": float(accuracy.mean()),
               "passkey_accuracy_within_train_len": float(accuracy[:, within].mean()) if within else None}
    settings = {"lengths": lengths, "depths": list(s.depths), "keys_per_cell": s.keys_per_cell, "seed": s.seed,
                "jrt": s.jrt, "train_seq_len": seq_len}
    details = {"accuracy": accuracy.tolist(), "prompt_tokens": grid["prompt_tokens"], "outputs": grid["outputs"]}
    return TaskResult("passkey", settings, figures, details,
                      lambda out: plot_passkey(accuracy, lengths, list(s.depths), seq_len, out))


def plot_passkey(accuracy: np.ndarray, lengths: list[int], depths: list[float], train_len: int, out_dir: Path) -> Path:
    """Heatmap: needle depth (rows) x prompt length (columns), accuracy as colour, training length dashed."""
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), value in np.ndenumerate(accuracy):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    # The training length sits between the last column within it and the first beyond it.
    boundary = sum(1 for n in lengths if n <= train_len) - 0.5
    if -0.5 < boundary < len(lengths) - 0.5:
        ax.axvline(boundary, color="k", ls="--", lw=1.5, label=f"training length {train_len}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("passkey retrieval accuracy")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return save_figure(fig, out_dir / "passkey.png")

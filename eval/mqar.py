"""The mqar task: multi-query associative recall as Zoology generates it (data/synthetic.py), accuracy
on the queried values only, each predicted from one forward pass over the example."""
import torch
from tqdm import tqdm

from configs.errors import ConfigError
from data.synthetic import IGNORE, check_mqar, mqar_set
from eval.results import TaskResult


def mqar_settings(cfg, dataset) -> dict:
    """eval.mqar with its nulls resolved: data=mqar's settings, else the tokenizer's vocabulary, 8 pairs, 0.01."""
    s, d = cfg.eval.mqar, cfg.data
    trained = d.source == "mqar"
    vocab = dataset.tokenizer.vocab_size if dataset.tokenizer is not None else dataset.vocab_size
    settings = {"vocab_size": s.vocab_size or vocab,
                "num_kv_pairs": s.num_kv_pairs or (d.num_kv_pairs if trained else 8),
                "seq_len": s.seq_len or cfg.train.seq_len,
                "power_a": s.power_a or (d.power_a if trained else 0.01),
                "num_examples": s.num_examples, "seed": s.seed, "jrt": s.jrt}
    check_mqar(settings["vocab_size"], settings["num_kv_pairs"], settings["seq_len"], settings["power_a"], "eval.mqar.")
    if settings["vocab_size"] > vocab:
        raise ConfigError(f"eval.mqar.vocab_size={settings['vocab_size']} is larger than the run's vocabulary {vocab}")
    return settings


@torch.no_grad()
def mqar_accuracy(model, settings: dict, batch_size: int, device: torch.device, autocast_dtype=None,
                  progress: bool = True) -> float:
    inputs, labels = mqar_set(settings["seed"], settings["num_examples"], settings["vocab_size"],
                              settings["num_kv_pairs"], settings["seq_len"], settings["power_a"], settings["jrt"])
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    was_training = model.training
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(inputs), batch_size), desc="mqar", disable=not progress, leave=False):
        batch = inputs[start:start + batch_size].to(device)
        target = labels[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch)
        queried = target != IGNORE
        correct += int((logits.argmax(-1)[queried] == target[queried]).sum())
    model.train(was_training)
    return correct / int((labels != IGNORE).sum())


def run(cfg, model, dataset, device, autocast_dtype=None, progress=True) -> TaskResult:
    settings = mqar_settings(cfg, dataset)
    accuracy = mqar_accuracy(model, settings, cfg.eval.batch_size, device, autocast_dtype, progress)
    return TaskResult("mqar", settings, {"mqar_accuracy": accuracy})

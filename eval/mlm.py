"""The mlm task (encoders): held-out masked-token accuracy and perplexity.

The held-out documents are packed as in training (`EOS doc EOS doc ...`, rows of train.seq_len, cu_seqlens at
every EOS, the last row padded and its padding never scored) and masked as train.objective=mlm masks (data/mlm.py:
exactly round(mask_rate x seq_len) positions of a row, 80/10/10), at eval.mlm.mask_rate (default 0.15, what LION
and BERT report) with eval.mlm.seed. Figures over the scored tokens: `mlm_accuracy` (the argmax is the original
token), `mlm_loss` (nats per token) and `mlm_perplexity` = exp(mlm_loss).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs.errors import ConfigError
from data.mlm import MLMConfig, mask_tokens
from eval.perplexity import cu_seqlens_for_rows, held_out_stream
from eval.results import TaskResult


@torch.no_grad()
def evaluate_mlm(model, documents, eos_id: int, mask_id: int, vocab_size: int, seq_len: int, batch_size: int,
                 max_tokens: int, mask_rate: float, seed: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    stream, _ = held_out_stream(documents, eos_id, max_tokens)
    n_rows = -(-len(stream) // seq_len)
    tokens = np.full(n_rows * seq_len, eos_id, dtype=np.int64)
    tokens[:len(stream)] = stream
    tokens = tokens.reshape(n_rows, seq_len)
    inputs, labels = mask_tokens(tokens, list(range(n_rows)), 0, seq_len, seed, MLMConfig(mask_rate=mask_rate),
                                 mask_id, vocab_size)
    padding = (np.arange(n_rows * seq_len) >= len(stream)).reshape(n_rows, seq_len)
    inputs[padding], labels[padding] = eos_id, -100
    tokens, inputs, labels = (torch.from_numpy(x) for x in (tokens, inputs, labels))
    was_training = model.training
    model.eval()
    nats, correct, scored = 0.0, 0, 0
    for start in tqdm(range(0, n_rows, batch_size), desc="mlm", disable=not progress, leave=False):
        rows = slice(start, start + batch_size)
        cu_seqlens = cu_seqlens_for_rows(tokens[rows], eos_id).to(device)  # the documents of the unmasked rows
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs[rows].to(device), cu_seqlens=cu_seqlens)
        target = labels[rows].to(device)
        where = target != -100
        picked, target = logits[where].float(), target[where]
        nats += F.cross_entropy(picked, target, reduction="sum").item()
        correct += int((picked.argmax(-1) == target).sum())
        scored += target.numel()
    model.train(was_training)
    loss = nats / scored
    return {"mlm_accuracy": correct / scored, "mlm_loss": loss, "mlm_perplexity": math.exp(loss),
            "mlm_scored_tokens": scored}


def check(cfg, dataset) -> None:
    if dataset.tokenizer is None:
        raise ConfigError(f"eval.tasks: mlm needs text, and data.source={cfg.data.source} has none")


def run(cfg, model, dataset, device, autocast_dtype=None, progress=True) -> TaskResult:
    check(cfg, dataset)
    settings = cfg.eval.mlm
    figures = evaluate_mlm(model, dataset.held_out_documents(), dataset.tokenizer.eos_id, dataset.vocab_size,
                           dataset.vocab_size, cfg.train.seq_len, cfg.eval.batch_size, cfg.eval.held_out_tokens,
                           settings.mask_rate, settings.seed, device, autocast_dtype, progress)
    return TaskResult("mlm", {"mask_rate": settings.mask_rate, "seed": settings.seed, "seq_len": cfg.train.seq_len,
                              "held_out_tokens": cfg.eval.held_out_tokens}, figures)

"""The ppl task: held-out loss in nats per token and bits per byte, and loss by position.

Held-out figures: documents are packed exactly as in training (`EOS doc EOS doc ...`, rows of seq_len + 1
tokens overlapping by one, the last row padded and its padding ignored; the recurrent state and attention
reset at each EOS), so every token of the evaluated stream is predicted exactly once. Bits per byte divides
the summed loss by the UTF-8 bytes of the documents scored, which makes models with different tokenizers
comparable.

Loss by position: the first max_len tokens of long held-out documents scored in one pass, state carried
across the whole length (not reset at each training-length row), averaged per position: how a model
uses context out to and beyond the length it was trained on (the curves of Mamba and Stuffed Mamba).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from configs.errors import ConfigError, DataError
from eval.results import TaskResult, plt, save_figure


@dataclass
class HeldOutResult:
    loss: float           # nats per token
    bits_per_byte: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict:
        return {"held_out_loss": self.loss, "held_out_bpb": self.bits_per_byte,
                "held_out_tokens": self.tokens, "held_out_bytes": self.bytes}


def held_out_stream(documents: Iterable[tuple[np.ndarray, int]], eos_id: int, max_tokens: int) -> tuple[np.ndarray, int]:
    """Concatenate whole documents as `EOS doc EOS doc ...` until max_tokens; return (stream, their bytes)."""
    pieces, n_tokens, n_bytes = [], 0, 0
    for tokens, doc_bytes in documents:
        if n_tokens and n_tokens + len(tokens) + 1 > max_tokens:
            break
        pieces += [np.array([eos_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)]
        n_tokens += len(tokens) + 1
        n_bytes += doc_bytes
    if not pieces:
        raise DataError("held-out split has no documents")
    return np.concatenate(pieces), n_bytes


def cu_seqlens_for_rows(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Segment starts over the flattened rows: every row start and every EOS (a document's first token)."""
    n_rows, seq_len = inputs.shape
    flat = inputs.flatten()
    starts = (flat == eos_id) | (torch.arange(flat.numel()) % seq_len == 0)
    bounds = torch.nonzero(starts).flatten().tolist() + [flat.numel()]
    return torch.tensor(bounds, dtype=torch.int32)


@torch.no_grad()
def evaluate_held_out(model, documents, eos_id: int, seq_len: int, batch_size: int, max_tokens: int,
                      device: torch.device, autocast_dtype: torch.dtype | None = None,
                      progress: bool = True) -> HeldOutResult:
    stream, n_bytes = held_out_stream(documents, eos_id, max_tokens)
    n_targets = len(stream) - 1
    n_rows = -(-n_targets // seq_len)
    # Pad the last row; its padded targets are ignored so exactly the documents' tokens are scored.
    padded = np.full(n_rows * seq_len + 1, eos_id, dtype=np.int64)
    padded[: len(stream)] = stream
    rows = torch.from_numpy(np.stack([padded[i * seq_len: (i + 1) * seq_len + 1] for i in range(n_rows)]))
    targets = rows[:, 1:].clone()
    targets.view(-1)[n_targets:] = -100
    was_training = model.training
    model.eval()
    total_nats = 0.0
    for start in tqdm(range(0, n_rows, batch_size), desc="held-out", disable=not progress, leave=False):
        inputs = rows[start: start + batch_size, :-1]
        labels = targets[start: start + batch_size].to(device)
        cu_seqlens = cu_seqlens_for_rows(inputs.cpu(), eos_id).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            total_nats += model(inputs.to(device), cu_seqlens=cu_seqlens, labels=labels, reduction="sum").item()
    model.train(was_training)
    return HeldOutResult(total_nats / n_targets, total_nats / math.log(2) / n_bytes, n_targets, n_bytes)


@torch.no_grad()
def score_tokens(model, inputs: torch.Tensor, targets: torch.Tensor, chunk_len: int,
                 autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target [B, T] and whether it was the argmax, from one pass over the rows:
    chunks of chunk_len tokens through `model.step`, the recurrent state and attention KV carried from one
    chunk to the next, so position t is scored with all t tokens before it (also past the training length)."""
    state = model.init_state(*inputs.shape)
    logprobs, greedy = [], []
    for start in range(0, inputs.shape[1], chunk_len):
        with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.step(inputs[:, start:start + chunk_len], state)
        logits = logits.float().log_softmax(-1)
        target = targets[:, start:start + chunk_len]
        logprobs.append(logits.gather(-1, target.clamp(min=0)[..., None])[..., 0])
        greedy.append(logits.argmax(-1) == target)
    return torch.cat(logprobs, dim=1), torch.cat(greedy, dim=1)


@torch.no_grad()
def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, chunk_len: int,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Loss (nats) of each target [B, T] from one pass over the rows, chunked and state carried as in
    score_tokens, through the fused head and loss (model/loss.py): no [B, chunk, vocab] logits."""
    state = model.init_state(*inputs.shape)
    losses = []
    for start in range(0, inputs.shape[1], chunk_len):
        with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model.step(inputs[:, start:start + chunk_len], state, labels=targets[:, start:start + chunk_len])
        losses.append(loss)
    return torch.cat(losses, dim=1)


@dataclass
class PositionCurve:
    """Mean loss (nats) at each position 1..max_len over `documents` held-out documents, and in buckets."""
    loss: np.ndarray        # [max_len]: loss of the token predicted from `position` tokens of context
    documents: int
    edges: list[int]        # bucket b holds positions edges[b] <= p < edges[b + 1]

    def buckets(self) -> list[dict]:
        return [{"start": lo, "end": hi - 1, "loss": float(self.loss[lo - 1:hi - 1].mean())}
                for lo, hi in zip(self.edges[:-1], self.edges[1:])]

    def mean_between(self, first: int, last: int) -> float | None:
        part = self.loss[first - 1:last]
        return float(part.mean()) if len(part) else None


def position_edges(max_len: int, num_buckets: int) -> list[int]:
    """Log-spaced bucket edges over positions [1, max_len], each bucket at least one position."""
    return sorted({int(round(e)) for e in np.geomspace(1, max_len + 1, num_buckets + 1)})


@torch.no_grad()
def loss_by_position(model, documents: Iterable[tuple[np.ndarray, int]], eos_id: int, max_len: int,
                     max_documents: int, num_buckets: int, chunk_len: int, batch_size: int, device: torch.device,
                     autocast_dtype: torch.dtype | None = None, progress: bool = True) -> PositionCurve:
    """Score the first max_len tokens of each held-out document at least that long (`EOS doc`, as packed
    in training), in one pass with the state carried (token_losses), and average the loss per position."""
    rows, longest = [], 0
    for tokens, _ in documents:
        longest = max(longest, len(tokens))
        if len(tokens) >= max_len:
            rows.append(np.concatenate([[eos_id], tokens[:max_len]]).astype(np.int64))
            if len(rows) == max_documents:
                break
    if not rows:
        raise DataError(f"eval.ppl.max_len={max_len}: no held-out document is that long (longest: {longest} "
                        "tokens); lower eval.ppl.max_len")
    rows = torch.from_numpy(np.stack(rows))
    was_training = model.training
    model.eval()
    total = torch.zeros(max_len, dtype=torch.float64)
    for start in tqdm(range(0, len(rows), batch_size), desc="ppl by position", disable=not progress, leave=False):
        batch = rows[start:start + batch_size].to(device)
        total += token_losses(model, batch[:, :-1], batch[:, 1:], chunk_len, autocast_dtype).double().sum(0).cpu()
    model.train(was_training)
    return PositionCurve((total / len(rows)).numpy(), len(rows), position_edges(max_len, num_buckets))


def check(cfg, dataset) -> None:
    if dataset.tokenizer is None:
        raise ConfigError(f"eval.tasks: ppl needs text, and data.source={cfg.data.source} has none (use mqar)")


def run(cfg, model, dataset, device, autocast_dtype=None, progress=True) -> TaskResult:
    """The ppl task: held-out figures and the per-position curve (settings from cfg.eval / cfg.eval.ppl)."""
    check(cfg, dataset)
    seq_len, settings = cfg.train.seq_len, cfg.eval.ppl
    max_len = settings.max_len or 4 * seq_len
    chunk_len = settings.chunk_len or seq_len
    eos_id = dataset.tokenizer.eos_id
    held_out = evaluate_held_out(model, dataset.held_out_documents(), eos_id, seq_len, cfg.eval.batch_size,
                                 cfg.eval.held_out_tokens, device, autocast_dtype, progress)
    curve = loss_by_position(model, dataset.held_out_documents(), eos_id, max_len, settings.max_documents,
                             settings.num_buckets, chunk_len, cfg.eval.batch_size, device, autocast_dtype, progress)
    figures = {**held_out.as_dict(), "ppl_loss_within_train_len": curve.mean_between(1, seq_len),
               "ppl_loss_beyond_train_len": curve.mean_between(seq_len + 1, max_len)}
    return TaskResult("ppl", {"max_len": max_len, "chunk_len": chunk_len, "num_buckets": settings.num_buckets,
                              "documents": curve.documents, "held_out_tokens": cfg.eval.held_out_tokens,
                              "train_seq_len": seq_len},
                      figures, {"buckets": curve.buckets()}, lambda out: plot_loss_by_position(curve, seq_len, out))


def plot_loss_by_position(curve: PositionCurve, train_len: int, out_dir: Path) -> Path:
    buckets = curve.buckets()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(b["start"] * b["end"]) ** 0.5 for b in buckets], [b["loss"] for b in buckets], marker="o", ms=3)
    ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log")
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss by position ({curve.documents} held-out documents)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, out_dir / "ppl_by_position.png")

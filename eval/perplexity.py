"""Held-out loss in nats per token and bits per byte.

Held-out documents are packed exactly as in training (`EOS doc EOS doc ...`, rows of seq_len + 1
tokens overlapping by one, the last row padded and its padding ignored; the recurrent state and attention reset at each EOS), so every token of
the evaluated stream is predicted exactly once. Bits per byte divides the summed loss by the UTF-8
bytes of the documents scored, which makes models with different tokenizers comparable.
"""
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm



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
        raise ValueError("held-out split has no documents")
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
            logits = model(inputs.to(device), cu_seqlens=cu_seqlens)
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
    model.train(was_training)
    return HeldOutResult(total_nats / n_targets, total_nats / math.log(2) / n_bytes, n_targets, n_bytes)
